"""A model's life: loading (names, dirs, GGUF), fine-tuning adapters, export, generation."""
