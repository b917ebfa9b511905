"""Restore or recompute: whether reading an agent's cache from disk beats prefilling it.

Reading a cache costs its bytes at the disk's rate; prefilling costs its tokens at the
model's rate. On a fast accelerator with a slow disk a short cache can be cheaper to
recompute; on this project's CPU build machine reading wins at every length (EXP-018
measures both). Both rates are measured as the server runs (moving averages of the reads
the store makes and of the prefills the engine runs), not configured: until both are
known for a model, a cache is read. Only the engine thread calls this.
"""

from __future__ import annotations

WEIGHT = 0.2  # of each new measurement in the moving averages
MIN_PREFILL_TOKENS = 32  # shorter prefills are mostly fixed cost, not a rate
MIN_READ_BYTES = 1 << 20  # so are smaller reads
# A cache is prefilled instead of read only when that is expected to take at most half the
# time: the rates are moving averages of noisy wall-clock measurements (a read slowed by
# a busy core sets the rate too), and a needless prefill throws away a cache that was there.
RECOMPUTE_MARGIN = 2.0


class RestoreOrRecompute:
    def __init__(self) -> None:
        self.read_seconds_per_byte: float | None = None
        self.prefill_seconds_per_token: dict[str, float] = {}  # by model (tag digest)

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else (1 - WEIGHT) * old + WEIGHT * new

    def read(self, nbytes: int, seconds: float) -> None:
        """A cache of ``nbytes`` (its file and chunks) was read and checked in ``seconds``."""
        if nbytes >= MIN_READ_BYTES:
            self.read_seconds_per_byte = self._average(self.read_seconds_per_byte,
                                                       seconds / nbytes)

    def prefilled(self, model: str, tokens: int, seconds: float) -> None:
        """``model`` prefilled ``tokens`` in ``seconds`` (to a request's first token)."""
        if tokens >= MIN_PREFILL_TOKENS:
            self.prefill_seconds_per_token[model] = self._average(
                self.prefill_seconds_per_token.get(model), seconds / tokens)

    def restore_pays(self, model: str, nbytes: int, tokens: int) -> bool:
        """Whether reading ``nbytes`` is to be preferred to prefilling the ``tokens`` they
        hold on ``model``: unless the prefill is expected to take at most 1/RECOMPUTE_MARGIN
        of the read (True until both rates are known)."""
        per_token = self.prefill_seconds_per_token.get(model)
        if self.read_seconds_per_byte is None or per_token is None:
            return True
        return nbytes * self.read_seconds_per_byte < RECOMPUTE_MARGIN * tokens * per_token
