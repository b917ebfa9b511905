"""What the server keeps to itself (issue 30): a Redis password never shows, even in a URL
that does not parse (one that holds /, # or ? cuts the URL short, and parsing the rest
quotes part of it), and the caches on disk are the server's user's alone: folders 0700,
files 0600, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import ValidationError

from semantic_server.cache.shared_store import SharedStore, redacted
from semantic_server.cli import CliError, _settings
from semantic_server.config import Settings
from tests.fakes import FAST_ADMIN_KEY

PASSWORD = "sEcr3t/pA55#w0Rd?zZ9"  # each of /, # and ? ends the URL's host part early
BAD_URLS = [  # the README's example's shape, and each way a password cuts a URL short
    f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    "redis://:sEcr3t/pA55@127.0.0.1:6379/0",  # the port would read "sEcr3t"
    "redis://uS3r:4321/pA55@127.0.0.1:6379/0",  # host "uS3r", port 4321, database "pA55@.."
    "redis://uS3r:4321?pA55@127.0.0.1:6379/0",  # the same, the rest a query
    "rediss://:sEcr3t#pA55@127.0.0.1:6380/0",
    "redis://:sEcr3t@127.0.0.1:6379/pA55",  # a database that is not a number
    "redis://:sEcr3t@:6379/0",  # no host
]
PIECES = ("sEcr3t", "pA55", "w0Rd", "zZ9", "uS3r", "4321")  # what no message may show


def _shows_the_password(text: str) -> bool:
    return any(piece in text for piece in PIECES)


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_redis_url_that_does_not_parse_is_refused_in_one_line_without_its_password(
        url, monkeypatch):
    with pytest.raises(ValidationError) as refused:
        Settings(cache_store=url)
    assert [error["loc"] for error in refused.value.errors()] == [("cache_store",)]
    message = str(refused.value)
    assert "percent-encode" in message and "%2F" in message
    assert not _shows_the_password(message)
    # what `semantic-server serve` prints: one line naming the variable, and the fix
    monkeypatch.setenv("SEMANTIC_CACHE_STORE", url)
    with pytest.raises(CliError) as printed:
        _settings()
    line = str(printed.value)
    assert line.startswith("invalid setting: SEMANTIC_CACHE_STORE: ") and "\n" not in line
    assert "percent-encode" in line and not _shows_the_password(line)
    # nor does anything below the settings show it, if handed the URL
    assert not _shows_the_password(redacted(url))
    with pytest.raises(ValueError) as store:
        SharedStore(url, 2**20)
    assert "percent-encode" in str(store.value)
    assert not _shows_the_password(str(store.value))


def test_the_password_percent_encoded_is_accepted_and_reaches_redis_decoded():
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:6379/0"
    assert url == "redis://:sEcr3t%2FpA55%23w0Rd%3FzZ9@127.0.0.1:6379/0"
    assert Settings(cache_store=url).cache_store.get_secret_value() == url
    shared = SharedStore(url, 2**20)  # no connection yet: Redis is called on first use
    try:
        kwargs = shared._client.connection_pool.connection_kwargs
        assert kwargs["password"] == PASSWORD
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6379, 0)
        assert shared.where == "redis://127.0.0.1:6379/0"
    finally:
        shared.close()
    for good in ("file", "redis://127.0.0.1:6379", "redis://h:6379/", "redis://[::1]:6379/2",
                 "rediss://user:p%40ss@h:6380/1?ssl_cert_reqs=none", "redis://:p@ss@h/0"):
        assert Settings(cache_store=good).cache_store.get_secret_value() == good


def test_percent_encoding_is_documented_where_the_operator_reads():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines()
               if line.startswith("| `SEMANTIC_CACHE_STORE`"))
    assert "percent-encode the password" in row and "`%2F`" in row and "`%23`" in row
    assert "percent-encoded" in Settings.model_fields["cache_store"].description


# B. The caches on disk


@pytest.fixture
def open_umask():
    """A umask that takes nothing off (0o000): only the server's own modes keep its files
    private, as they must whatever umask it is started with."""
    before = os.umask(0)
    yield
    os.umask(before)


def _modes(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The mode of every folder (``root`` included) and every file under ``root``."""
    folders = {str(root): oct(stat.S_IMODE(root.stat().st_mode))}
    files = {}
    for path in root.rglob("*"):
        mode = oct(stat.S_IMODE(path.lstat().st_mode))
        (folders if path.is_dir() else files)[str(path.relative_to(root))] = mode
    return folders, files


def _kinds(files: dict[str, str]) -> set[str]:
    """What kinds of file ``files`` holds: by folder (chunks, quarantine, responses) and
    the tag files."""
    return {"tag.json" if name.endswith("tag.json") else Path(name).parent.name
            for name in files if len(Path(name).parts) > 1}


def test_the_servers_cache_folders_are_0700_and_its_files_0600(open_umask, make_client,
                                                                tmp_path):
    client = make_client(cache_chunk_tokens=4)  # a prompt's whole chunks are their own files
    admin = {"X-Admin-Key": FAST_ADMIN_KEY}
    agents = ("one", "two", "three")
    chat = {"messages": [{"role": "user", "content": "several chunks of four tokens " * 4}],
            "max_tokens": 4}
    for agent in agents:
        reply = client.post("/v1/chat/completions", headers={"X-Agent-ID": agent}, json=chat)
        assert reply.status_code == 200, reply.text
    assert client.post("/v1/responses", json={"input": "Hi", "store": True}).status_code == 200
    assert client.post("/admin/models/swap", json={"model_id": "fake-b"},
                       headers=admin).status_code == 200  # every hot cache to disk
    caches = tmp_path / "caches"
    written = _modes(caches)
    assert {"chunks", "responses", "tag.json"} <= _kinds(written[1])  # each kind written
    for damaged in caches.glob("*/*.safetensors"):  # read back, rejected, quarantined
        damaged.write_bytes(damaged.read_bytes()[:-8])
    assert client.post("/admin/models/swap", json={"model_id": "fake-a"},
                       headers=admin).status_code == 200
    for agent in agents:
        assert client.post("/v1/chat/completions", headers={"X-Agent-ID": agent},
                           json=chat).status_code == 200
    quarantined = _modes(caches)
    assert "quarantine" in _kinds(quarantined[1])
    for folders, files in (written, quarantined):
        assert set(folders.values()) == {"0o700"}, folders
        assert set(files.values()) == {"0o600"}, files
