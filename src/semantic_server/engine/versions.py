"""Which model version a request runs on: the serving one, those beside it, and those
retiring.

The *serving* version takes the requests that name no model (or name it); models loaded
*beside* it (``POST /admin/models/load``) take the requests that name them. A request pins
the version that serves its model when it starts and holds the pin to its end, so it
runs entirely on one model. A promotion switches which version new requests pin: one
assignment on the event loop, where every pin is taken, so no request can see half of it.
The version it replaced retires: its pinned requests finish on it, and it is reclaimed
only after the last one ends (the atomic-pointer-plus-refcount pattern of hot swapping).
All methods run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from semantic_server.errors import GenerationFailed, ModelNotLoaded
from semantic_server.models.adapters import Adapter
from semantic_server.models.registry import LoadedModel

log = logging.getLogger(__name__)


class VersionState(StrEnum):
    """Where a model version is in its life (each change is logged)."""

    LOADING = "loading"  # being loaded beside the serving model
    WARMING = "warming"  # loaded, its health check running
    SERVING = "serving"  # new requests pin it
    RETIRING = "retiring"  # replaced: its pinned requests finish on it
    RETIRED = "retired"  # its last request ended
    RECLAIMED = "reclaimed"  # its caches written, its memory given back


# The allowed transitions, in one place. A version loaded beside the serving model is
# loading, then warming, then serving; one loaded by a sequential swap (or at startup)
# starts serving. A version replaced by a promotion, or removed from beside, retires; it
# is retired once its last request ends (or its pins are forgotten), then reclaimed. A
# ModelVersion holds serving, retiring and retired; the orchestrator logs the others
# (before the version takes requests, after it is gone). A sequential swap withdraws the
# serving version only when nothing is pinned to it, and unloads it at once.
_TRANSITIONS = {
    VersionState.LOADING: {VersionState.WARMING},
    VersionState.WARMING: {VersionState.SERVING},
    VersionState.SERVING: {VersionState.RETIRING},
    VersionState.RETIRING: {VersionState.RETIRED},
    VersionState.RETIRED: {VersionState.RECLAIMED},
    VersionState.RECLAIMED: set(),
}


def log_transition(loaded: LoadedModel | str, state: VersionState, **fields: object) -> None:
    """One log line per lifecycle transition of a model version."""
    model_id = loaded if isinstance(loaded, str) else loaded.model_id
    version = None if isinstance(loaded, str) else loaded.version
    log.info("model version", extra={"fields": {
        "model": model_id, "version": version, "state": state.value, **fields}})


@dataclass(eq=False)
class ModelVersion:
    """A loaded model as requests see it: how many are pinned to it, when the last one
    left, and the adapter its requests use unless they name one (an adapter swap changes
    it for the requests admitted after it)."""

    loaded: LoadedModel
    state: VersionState = VersionState.SERVING
    pins: int = 0
    adapter: Adapter | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def transition(self, state: VersionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"model version {self.loaded.model_id} cannot go from "
                               f"{self.state.value} to {state.value}")
        self.state = state


class ModelVersions:
    def __init__(self) -> None:
        self.serving: ModelVersion | None = None
        self.beside: dict[str, ModelVersion] = {}  # model id -> a version loaded beside
        self.retiring: list[ModelVersion] = []

    @property
    def loaded(self) -> LoadedModel | None:
        """The model new requests that name no model run on."""
        return self.serving.loaded if self.serving else None

    def _live(self) -> list[ModelVersion]:
        """Every version that takes new requests: the serving one first."""
        return [*([self.serving] if self.serving else []), *self.beside.values()]

    def live_models(self) -> list[str]:
        """The models that take new requests: the serving one first."""
        return [v.loaded.model_id for v in self._live()]

    def resident(self, model_id: str) -> LoadedModel | None:
        """The version that takes new requests naming ``model_id``, if one does."""
        return next((v.loaded for v in self._live() if v.loaded.model_id == model_id), None)

    def pinned(self) -> dict[int, tuple[str, int, str | None, VersionState]]:
        """Requests pinned per version: version -> (model id, pins, adapter name, state)."""
        return {v.loaded.version: (v.loaded.model_id, v.pins,
                                   v.adapter.name if v.adapter else None, v.state)
                for v in [*self._live(), *self.retiring]}

    def adapter_of(self, loaded: LoadedModel) -> Adapter | None:
        """The adapter requests on ``loaded`` use unless they name one."""
        return next((v.adapter for v in [*self._live(), *self.retiring]
                     if v.loaded is loaded), None)

    def set_adapter(self, loaded: LoadedModel, adapter: Adapter | None) -> None:
        """Requests admitted to ``loaded`` from now on use ``adapter``: one assignment on
        the event loop, so each request sees the old adapter or the new, whole."""
        version = next((v for v in self._live() if v.loaded is loaded), None)
        if version is None:
            raise RuntimeError(f"{loaded.model_id} no longer takes requests")
        version.adapter = adapter

    @contextmanager
    def pin(self, model_id: str | None = None) -> Iterator[LoadedModel]:
        """Hold the version that serves ``model_id`` (None: the serving one) for the body:
        it is not reclaimed before the body ends. A model that is available but not
        resident is a 409."""
        if self.serving is None:
            raise GenerationFailed("no model is loaded")
        version = self.serving if model_id is None else next(
            (v for v in self._live() if v.loaded.model_id == model_id), None)
        if version is None:
            resident = ", ".join(v.loaded.model_id for v in self._live())
            raise ModelNotLoaded(f"model {model_id!r} is available but not loaded (loaded: "
                                 f"{resident}); load it or swap to it first")
        version.pins += 1
        version._idle.clear()
        try:
            yield version.loaded
        finally:
            version.pins -= 1
            if version.pins == 0:
                version._idle.set()

    def promote(self, loaded: LoadedModel) -> float:
        """New requests pin ``loaded`` from now on; the version it replaces retires.
        Returns how long the switch took, in seconds (nothing is admitted meanwhile)."""
        started = time.perf_counter()
        old, self.serving = self.serving, ModelVersion(loaded)
        if old is not None:
            old.transition(VersionState.RETIRING)
            self.retiring.append(old)
        pause = time.perf_counter() - started
        log_transition(loaded, VersionState.SERVING, promotion_pause_ms=round(pause * 1e3, 4))
        if old is not None:
            log_transition(old.loaded, VersionState.RETIRING, pinned=old.pins)
        return pause

    def add(self, loaded: LoadedModel) -> None:
        """``loaded`` takes the requests that name it, beside the serving model."""
        self.beside[loaded.model_id] = ModelVersion(loaded)
        log_transition(loaded, VersionState.SERVING, beside=True)

    def remove(self, model_id: str) -> LoadedModel:
        """The model loaded beside as ``model_id`` takes no new request and retires: its
        pinned requests finish on it (wait for them with :meth:`retire`)."""
        version = self.beside.pop(model_id)
        version.transition(VersionState.RETIRING)
        self.retiring.append(version)
        log_transition(version.loaded, VersionState.RETIRING, pinned=version.pins)
        return version.loaded

    def withdraw(self) -> LoadedModel | None:
        """No version serves any more (a sequential swap's shutdown, after its drain)."""
        old, self.serving = self.serving, None
        if old is not None and old.pins:
            self.serving = old
            raise RuntimeError(f"{old.pins} requests still run on {old.loaded.model_id}")
        return old.loaded if old else None

    def forget(self, loaded: LoadedModel) -> None:
        """Stop tracking a retiring version whose last pins never ended (their jobs were
        cancelled): a request still holding one fails if it submits anything."""
        for version in [v for v in self.retiring if v.loaded is loaded]:
            version.transition(VersionState.RETIRED)
            self.retiring.remove(version)
            log_transition(loaded, VersionState.RETIRED, forgotten_pins=version.pins)

    async def retire(self, loaded: LoadedModel) -> None:
        """Wait until the last request pinned to retiring ``loaded`` has ended."""
        version = next((v for v in self.retiring if v.loaded is loaded), None)
        if version is None:
            return
        await version._idle.wait()
        version.transition(VersionState.RETIRED)
        self.retiring.remove(version)
        log_transition(loaded, VersionState.RETIRED)
