"""A model version's life: the transitions its states allow, and those they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from semantic_server.engine.versions import ModelVersion, ModelVersions, VersionState
from semantic_server.models.registry import LoadedModel, LoadStats, MemorySnapshot
from semantic_server.models.tag import ModelTag
from tests.fakes import DIMS

pytestmark = pytest.mark.anyio
S = VersionState
# A version loaded beside the serving model goes through every state, in this order.
ALLOWED = {(S.LOADING, S.WARMING), (S.WARMING, S.SERVING), (S.SERVING, S.RETIRING),
           (S.RETIRING, S.RETIRED), (S.RETIRED, S.RECLAIMED)}


def _loaded(model_id: str) -> LoadedModel:
    memory = MemorySnapshot(0, 0, 0)
    return LoadedModel(model_id, Path(model_id), None, None, {},
                       ModelTag(model_id, f"fp-{model_id}", DIMS), LoadStats(0.0, memory, memory))


@pytest.mark.parametrize("old", list(S))
@pytest.mark.parametrize("new", list(S))
def test_a_version_moves_only_along_its_life(old, new):
    version = ModelVersion(_loaded("fake-a"), state=old)
    if (old, new) in ALLOWED:
        version.transition(new)
        assert version.state is new
    else:
        with pytest.raises(RuntimeError, match=f"from {old.value} to {new.value}"):
            version.transition(new)
        assert version.state is old


async def test_a_promotion_retires_the_old_version_which_cannot_serve_again():
    versions = ModelVersions()
    old, new = _loaded("fake-a"), _loaded("fake-b")
    versions.promote(old)
    with versions.pin() as pinned:
        assert pinned is old
        versions.promote(new)
        assert versions.pinned()[old.version][3] is S.RETIRING
    retired = versions.retiring[0]
    await versions.retire(old)
    assert retired.state is S.RETIRED and versions.retiring == []
    with pytest.raises(RuntimeError, match="from retired to serving"):
        retired.transition(S.SERVING)


async def test_a_version_beside_retires_when_removed():
    versions = ModelVersions()
    versions.promote(_loaded("fake-a"))
    beside = _loaded("fake-b")
    versions.add(beside)
    assert versions.pinned()[beside.version][3] is S.SERVING
    versions.remove("fake-b")
    retiring = versions.retiring[0]
    assert retiring.loaded is beside and retiring.state is S.RETIRING
    versions.forget(beside)  # its last pins never ended: retired without waiting for them
    assert retiring.state is S.RETIRED and beside.version not in versions.pinned()
