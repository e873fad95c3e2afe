"""Where records come from: local files, HF datasets, custom hooks, pydoc, the stdlib."""
