"""Write-behind for agent caches: files written on a thread of their own.

An LRU spill used to write its file on the engine thread, so every running stream stalled
while 50-100 MB went to disk. Now the engine thread only prepares the file (its MLX part,
``prepare_file``: zero-copy for native KV) and queues it; this thread checksums and writes
it, retrying a failed write once. Results come back through ``done``, which the store
reads on the engine thread (it alone changes the store's indexes).

The queue is first in, first out with one writer, so two writes of one agent's file land
in the order they were queued: the newest cache is the one left on disk.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semantic_server.cache.cache_file import PreparedFile, write_prepared

log = logging.getLogger(__name__)
ATTEMPTS = 2  # a failed write is retried once: a transient error (EINTR, a busy disk) passes


@dataclass(frozen=True)
class WriteJob:
    number: int  # increasing: tells a job from a newer one of the same file
    path: Path
    prepared: PreparedFile


@dataclass(frozen=True)
class WriteDone:
    job: WriteJob
    size: int | None  # bytes written; None: every attempt failed
    error: str | None = None


class CacheWriter:
    """One thread that writes prepared cache files in the order they were queued."""

    def __init__(self, write: Callable[[Path, PreparedFile], int] = write_prepared) -> None:
        self._write = write
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._numbers = itertools.count(1)
        self.done: deque[WriteDone] = deque()  # appended here, taken by the engine thread
        self._finished = 0  # the number of the last job done (jobs end in their order)
        self.on_done: Callable[[], None] | None = None  # told after each job (the engine)
        self._progress = threading.Condition()
        self.closed = False  # closing: it takes no more jobs (what was queued is written)
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def submit(self, path: Path, prepared: PreparedFile) -> WriteJob:
        if self.closed:
            raise RuntimeError("the cache writer is closed")
        job = WriteJob(next(self._numbers), path, prepared)
        self._jobs.put(job)
        return job

    def finished(self, number: int) -> bool:
        """Whether job ``number`` (and every job before it) is done."""
        return self._finished >= number

    def wait(self, number: int) -> None:
        """Wait until job ``number`` (and every job before it) is done, or the writer is
        closing (its callers then write their files themselves)."""
        with self._progress:
            self._progress.wait_for(lambda: self._finished >= number or self.closed)

    def flush(self) -> None:
        """Wait until every queued file is written (or has failed)."""
        self._jobs.join()

    def close(self) -> None:
        """Write what is queued, then stop the thread (from now on, callers write their
        files themselves, and nobody waits for the writer)."""
        with self._progress:
            self.closed = True
            self._progress.notify_all()
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self.done.append(self._attempt(job))
            finally:
                with self._progress:
                    self._finished = job.number
                    self._progress.notify_all()
                if self.on_done is not None:
                    self.on_done()
                self._jobs.task_done()
        self._jobs.task_done()

    def _attempt(self, job: WriteJob) -> WriteDone:
        error = "not attempted"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return WriteDone(job, self._write(job.path, job.prepared))
            except Exception as exc:  # any failure: retried, then reported, never fatal
                error = f"{type(exc).__name__}: {exc}"
                log.warning("cache write failed (attempt %d of %d): %s", attempt, ATTEMPTS,
                            error)
        return WriteDone(job, None, error)
