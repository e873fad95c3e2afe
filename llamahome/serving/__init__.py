"""The OpenAI-compatible HTTP server behind ``python -m llamahome.serve``.

``schemas`` holds the request and response models (OpenAI's shapes), ``engine`` the thread that
owns the model and batches requests, ``app`` the FastAPI routes. No Lightning, no training code.
"""
