"""The server's error types.

Each names one thing that went wrong; ``api/errors.py`` maps them to HTTP statuses in
one table, so no other module decides the status of an error.
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


class ResponseNotFound(SemanticServerError):
    """No stored response with this id (for this tenant)."""


class AdapterNotFound(SemanticServerError):
    """No adapter of that name in the adapters folder."""


class AdapterInvalid(SemanticServerError):
    """An adapter's files are present but unusable (malformed, not LoRA, inconsistent)."""


class AdapterIncompatible(SemanticServerError):
    """A valid adapter that does not fit the model's prepared layers (another base, a
    larger rank, modules it was not prepared for)."""


class ModelTooLarge(SemanticServerError):
    """A model does not fit the memory budget (at all, or beside the serving model)."""


class InvalidRequest(SemanticServerError):
    """The request is malformed or asks for something not allowed; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None,
                 code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages", code="context_length_exceeded")


class PayloadTooLarge(SemanticServerError):
    """The request body is larger than ``max_body_bytes``."""


class ModelNotLoaded(SemanticServerError):
    """The request names an available model that is not the loaded one."""


class Retryable(SemanticServerError):
    """The request could not run now; the client may retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AdapterSlotsBusy(Retryable):
    """Every adapter slot of the model is in use by running requests."""


class ServerBusy(Retryable):
    """A swap held the request longer than the hold limit."""


class AgentBusy(Retryable):
    """Another request of the same agent held its cache longer than the hold limit."""


class QueueFull(Retryable):
    """Too many requests are already waiting (``SEMANTIC_MAX_QUEUED``)."""


class ServiceDegraded(SemanticServerError):
    """No model serves: a swap and its rollback failed, or the engine thread stopped. The
    message is short and safe to show anyone; the details are in the admin API and logs."""


class GenerationFailed(SemanticServerError):
    """The engine could not run the request (an internal fault, reported without details)."""


class ModelLoadFailed(SemanticServerError):
    """A model a request named could not be loaded on demand (the others serve on)."""


class ModelStateConflict(SemanticServerError):
    """A model operation that contradicts what is resident (loading a model already
    loaded, unloading the serving model)."""


class SwapInProgress(SemanticServerError):
    """Only one swap runs at a time."""


class AdminDisabled(SemanticServerError):
    """No admin key is configured, so the admin API is off."""


class Unauthorized(SemanticServerError):
    """The X-Admin-Key header is missing or wrong."""


class InvalidApiKey(SemanticServerError):
    """API keys are configured and the request carries none of them."""


class HostNotAllowed(SemanticServerError):
    """A server bound to loopback got a request for another host (DNS rebinding)."""


class UnsupportedMediaType(SemanticServerError):
    """A POST whose body is not declared as JSON (a web page's form post, say)."""


class CacheWriteError(SemanticServerError):
    """Agent caches could not be written to disk (a full disk); they are still in memory."""
