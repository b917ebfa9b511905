"""The server's error types.

Each names one thing that went wrong; ``api/errors.py`` maps them to HTTP statuses in
one table, so no other module decides a status code.
"""

from __future__ import annotations


class SemanticServerError(Exception):
    """Base of every error this package raises on purpose."""


class GGUFImportError(SemanticServerError):
    """A GGUF file could not be imported; the message is one line naming the problem."""


class ModelNotFound(SemanticServerError):
    """No model with this id is in the catalog."""


class ModelLoadError(SemanticServerError):
    """A model exists but could not be loaded or failed its warm-up."""


class ModelInvalid(SemanticServerError):
    """A model's files are present but unusable (bad config, wrong shapes)."""
