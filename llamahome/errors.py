"""The exception hierarchy: every user mistake ends in one of these, as one clear line."""


class LlamaHomeError(Exception):
    """Base class for errors that LlamaHome reports to the user as one line."""


class ConfigError(LlamaHomeError):
    """A configuration value is missing, unknown or out of range (the message names the key)."""


class ModelError(LlamaHomeError):
    """A model or tokenizer could not be built or loaded (the message says what was tried)."""


class DataError(LlamaHomeError):
    """A data file or record is missing or malformed (the message names the file and line)."""


class CacheError(LlamaHomeError):
    """A KV-cache policy or budget is invalid (the message names the key)."""


class StorageError(LlamaHomeError):
    """A file could not be written (disk full, quota): the message names the file and the fix."""
