"""Change a serving model's LoRA adapter in place, without reloading the model (ADR-014).

Three timed steps, none of which stops anyone:

1. **check**: the adapter's files are read and checked against the model's prepared
   layers (another base, DoRA against LoRA layers, a larger rank than prepared, modules
   the model was not prepared for: a 4xx naming why, before anything changes);
2. **copy**: on the engine thread, between two steps, its weights are copied into a free
   slot of the prepared layers (never into a slot a running request uses);
3. **switch**: one assignment on the event loop: requests admitted from now on use it.

Requests admitted before the switch hold the old adapter's slot to their end, so each
request runs on one adapter version; the old adapter stays resident in its slot (a swap
back costs no copy) until another adapter needs the slot. Agents' caches are tagged by
adapter, so none is reused under another adapter, and each comes back with its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.versions import ModelVersions
from semantic_server.errors import ModelNotLoaded, SemanticServerError
from semantic_server.models.adapters import Adapter, AdapterCatalog
from semantic_server.models.lora import check_adapter
from semantic_server.swap_result import AdapterSwapOutcome, AdapterSwapResult

if TYPE_CHECKING:
    from semantic_server.observer import Observer
    from semantic_server.swap.orchestrator import ModelSwapOrchestrator

log = logging.getLogger(__name__)


class AdapterSwapper:
    def __init__(self, adapters: AdapterCatalog, engine: BatchEngine, versions: ModelVersions,
                 orchestrator: ModelSwapOrchestrator, observer: Observer) -> None:
        self.adapters = adapters
        self.engine = engine
        self.versions = versions
        self.orchestrator = orchestrator  # one swap of any kind at a time; its history
        self.observer = observer

    async def swap(self, model_id: str, name: str | None) -> AdapterSwapResult:
        """Make ``name`` (None: no adapter) the adapter of serving model ``model_id``."""
        with self.orchestrator.exclusive("adapter"):
            return await self._swap(model_id, name)

    async def _swap(self, model_id: str, name: str | None) -> AdapterSwapResult:
        started = time.perf_counter()
        loaded = self.versions.resident(model_id)
        if loaded is None:
            raise ModelNotLoaded(f"model {model_id!r} is not loaded")
        adapter = await asyncio.to_thread(self._checked, loaded, name)
        old = self.versions.adapter_of(loaded)
        result = AdapterSwapResult(AdapterSwapOutcome.SUCCESS, model_id,
                                   old.name if old else None, name,
                                   adapter.fingerprint if adapter else None,
                                   check_ms=(time.perf_counter() - started) * 1e3)
        if adapter is not None:
            copy_started = time.perf_counter()
            try:
                load = await self.engine.on_thread(
                    lambda: self.engine.load_adapter(loaded, adapter))
            except SemanticServerError:  # refused (slots busy, files changed): nothing changed
                raise
            except Exception as exc:
                result.status = AdapterSwapOutcome.FAILED
                result.message = f"the copy failed, {old.name if old else 'none'} stays: {exc}"
                log.error("adapter swap failed", extra={"fields": {
                    "model": model_id, "adapter": name, "error": str(exc)}})
                return self._finish(result, started)
            result.copy_ms = (time.perf_counter() - copy_started) * 1e3
            result.slot, result.copied = load.slot, load.copied
        switch_started = time.perf_counter()
        try:
            self.versions.set_adapter(loaded, adapter)
        except RuntimeError:  # a model swap promoted another version meanwhile
            raise ModelNotLoaded(f"model {model_id!r} was swapped during the adapter swap; "
                                 f"nothing changed") from None
        result.switch_ms = (time.perf_counter() - switch_started) * 1e3
        result.message = (f"{model_id}: adapter {old.name if old else 'none'} -> "
                          f"{name or 'none'}")
        log.info("adapter swapped", extra={"fields": {
            "model": model_id, "old": result.old_adapter, "new": name, "slot": result.slot,
            "copied": result.copied, "copy_ms": round(result.copy_ms, 3)}})
        return self._finish(result, started)

    def _checked(self, loaded: Any, name: str | None) -> Adapter | None:
        """The adapter called ``name``, checked against ``loaded``'s prepared layers."""
        if name is None:
            return None
        adapter = self.adapters.resolve(name)
        check_adapter(loaded.lora, adapter, loaded.model_id)
        return adapter

    def _finish(self, result: AdapterSwapResult, started: float) -> AdapterSwapResult:
        result.duration_ms = (time.perf_counter() - started) * 1e3
        self.orchestrator.history.append(result)
        self.observer.adapter_swap_finished(result)
        return result
