"""Every knob of the server, read once from the environment (prefix ``SEMANTIC_``).

One class so that a user can see every setting in one place and a test can build a
server with any combination of them without touching the environment.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]
# Tokens a prefix chunk holds (cache/prefix_chunks.py): small enough that a 1,500-token
# system prompt is nearly all in whole chunks, large enough that a 2K-token cache is 16
# files, not hundreds.
CHUNK_TOKENS = 128
API_KEY_MIN_LENGTH = 8  # shorter API keys are refused at startup (SEMANTIC_API_KEYS)
REDIS_URL_FORM = "redis://[:password@]host:port/db"
# what the refusal of a Redis URL says to do: a password's reserved characters cut the URL
# short (a / starts its path, ? its query, # its fragment), so they are percent-encoded
PERCENT_ENCODING = ("percent-encode its password (/ as %2F, # as %23, ? as %3F, @ as %40, "
                    "% as %25; urllib.parse.quote(password, safe=''))")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, or None when it parses as host, port and database.

    The answer never quotes the URL, or any part of it: it may hold a password, and a
    password holding /, ? or # leaves parts of itself where the host, port or database
    would be read (``redis://:pa/ss@host`` reads port "pa" and database "ss@host").
    """
    if not url.startswith(("redis://", "rediss://")):
        return "must be file or a redis:// or rediss:// URL"
    invalid = f"is not a valid Redis URL ({REDIS_URL_FORM}): {PERCENT_ENCODING}"
    parts = urlsplit(url)
    try:
        _ = parts.port  # parsed when read; its ValueError would quote the password
    except ValueError:
        return invalid
    after_host = url[len(parts.scheme) + 3 + len(parts.netloc):]
    if not parts.hostname or "@" in after_host or parts.fragment \
            or not re.fullmatch(r"/?\d*", parts.path):
        return invalid
    return None


class CacheReuse(StrEnum):
    """Which cold caches a model may load."""

    EXACT = "exact"  # only those written by the same weights
    DIMS = "dims"  # any written by a model of the same cache geometry


class DiskFormat(StrEnum):
    """How cache files store their KV arrays (see cache/disk_format.py)."""

    NATIVE = "native"  # as computed, lossless
    FLOAT16 = "float16"
    Q8 = "q8"  # MLX affine quantization, 8 bits
    Q4 = "q4"  # the same, 4 bits


class Settings(BaseSettings):
    """Server settings; each field is also the environment variable ``SEMANTIC_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SEMANTIC_", extra="ignore",
                                      hide_input_in_errors=True)  # values may be secrets

    # Models
    model: str = Field(
        "smollm2-135m-instruct", description="Model id loaded at startup (see the catalog)."
    )
    models_dir: Path = Field(Path("models"), description="Folder of imported MLX models.")
    adapters_dir: Path = Field(
        Path("adapters"), description="Folder of LoRA adapters in mlx-lm's format, one "
        "folder each (adapter_config.json + adapters.safetensors).")
    lora_slots: int = Field(
        4, ge=2, le=64, description="Adapter slots in each model's prepared LoRA layers, "
        "counting 'no adapter': how many adapters (plus the base) run in one batch at once.")
    lora_max_rank: int | None = Field(
        None, ge=0, description="Rank a model's LoRA layers are prepared for when it loads; "
        "default the largest rank among its adapters; 0 never prepares them.")
    extra_models: list[str] = Field(
        default_factory=list,
        description="More model ids: local MLX directories or HF repo ids in the local HF cache.",
    )
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="Dtype the weights are computed in; auto = float32 on the CPU backend "
        "(only float32 reaches BLAS there), the model's own dtype on a GPU.",
    )
    blas_library: str = Field(
        "auto",
        description="Linux only: path of an OpenBLAS to load before MLX, 'auto' to find one, "
        "'off' to keep MLX's bundled reference BLAS.",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 2**20, gt=0, description="Largest request body accepted.")
    max_tokens_limit: int = Field(4096, gt=0, description="Largest max_tokens a request may ask.")
    default_max_tokens: int = Field(512, gt=0, description="max_tokens when a request omits it.")
    send_timeout_seconds: float = Field(
        30.0, gt=0, description="A client that takes no chunk of its reply for this long is "
        "cut off and its request cancelled.")
    max_context_tokens: int | None = Field(
        None, gt=0, description="Prompt plus completion limit; default each model's own "
        "context (max_position_embeddings), which this caps when set.")

    # Engine and caches
    max_batch: int = Field(16, gt=0, description="Most sequences decoded together.")
    prefill_step_size: int = Field(
        512, gt=0, description="Prompt tokens per prefill step; smaller keeps decoding smoother.")
    kv_budget_bytes: int | None = Field(
        None, gt=0, description="Memory for hot agent caches; default a quarter of free RAM.")
    block_tokens: int = Field(256, gt=0, description="Tokens per KV block of the BlockPool.")
    shared_prefix_entries: int = Field(
        8, ge=0, description="Prefix caches kept for anonymous requests (within an eighth of "
        "the KV budget).")
    max_queued: int = Field(
        64, gt=0, description="Requests that may wait (for a swap, their agent's previous "
        "request, a batch slot or KV room); more get 429 with Retry-After.")

    cache_dir: Path = Field(
        Path.home() / ".cache" / "semantic-server" / "agents",
        description="Where evicted agent caches live, one folder per model tag.")
    cache_reuse: CacheReuse = Field(
        CacheReuse.EXACT, description="exact: a cache loads only on the weights that wrote "
        "it; dims: on any model with the same cache shape.")
    cache_disk_bytes: int | None = Field(
        None, gt=0, description="Disk budget of cold caches, the oldest deleted first to make "
        "room; default half the free space of the cache folder's disk at startup.")

    # Access
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="JSON list of API keys; when set, /v1 requests need one (Authorization: "
        "Bearer <key>, or x-api-key) and each key's agents are its own. Each key is at "
        f"least {API_KEY_MIN_LENGTH} characters, with no whitespace at either end.")

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        """A blank key would let in every request that carries none; a short one is
        guessed. The message names the key by its place, never by its value."""
        for number, key in enumerate(keys, 1):
            value = key.get_secret_value()
            if len(value) < API_KEY_MIN_LENGTH or value != value.strip():
                raise ValueError(
                    f"API key {number} of {len(keys)} is unusable: each key must be at "
                    f"least {API_KEY_MIN_LENGTH} characters, with no whitespace at either end")
        return keys

    # Admin and swaps
    admin_key: SecretStr | None = Field(
        None, description="X-Admin-Key for /admin; unset turns the admin API off (403).")
    swap_hold_seconds: float = Field(
        120.0, gt=0, description="How long a request waits for a swap before a 503.")
    load_on_demand: bool = Field(
        False, description="A request naming an available model that is not resident "
        "loads it (beside the others when it fits, else in place of the least recently "
        "used one that may leave); off: such a request is a 409.")
    min_residency_seconds: float = Field(
        10.0, ge=0, description="How long a model stays before load on demand may make it "
        "leave for another.")
    keep_alive_seconds: float | None = Field(
        None, gt=0, description="Unload a model loaded beside the serving one after this "
        "long without a request; unset: never.")
    pinned_models: list[str] = Field(
        default_factory=list, description="JSON list of model ids load on demand and "
        "keep-alive never make leave.")
    max_model_queue: int = Field(
        32, gt=0, description="Requests that may wait for one model to load; more get 429.")
    cache_store: SecretStr = Field(
        SecretStr("file"), description="Where cold caches live: file (this server's "
        f"folder) or {REDIS_URL_FORM} (the folder, and Redis, which other servers read: "
        "any server resumes any agent), its password percent-encoded (/ as %2F, # as %23, "
        "? as %3F). A secret: it may hold a password.")
    redis_max_value_bytes: int = Field(
        256 * 2**20, gt=0, description="Caches whose file is larger stay in the local "
        "folder only.")
    @field_validator("cache_store")
    @classmethod
    def _known_store(cls, store: SecretStr) -> SecretStr:
        """The message never quotes the value: it may hold a password."""
        value = store.get_secret_value()
        if value != "file" and (problem := redis_url_problem(value)) is not None:
            raise ValueError(problem)
        return store

    agent_lease_seconds: float = Field(
        30.0, gt=0, description="With Redis: how long an agent's lease lasts unless its "
        "server renews it (a server that dies frees its agents after this long).")
    cache_write_behind: bool = Field(
        True, description="Write caches evicted to make room on a writer thread, so running "
        "streams do not stall on the disk (a swap and shutdown still wait for every write); "
        "false: write them on the engine thread.")
    cache_write_behind_bytes: int | None = Field(
        None, ge=0, description="Most memory that caches evicted to make room may hold while "
        "they wait for the writer thread; an eviction beyond it waits for the disk (as "
        "without write-behind). So hot caches and these together stay within the KV budget "
        "plus this (or one spill larger than it, alone). Default a quarter of the KV budget.")
    cache_disk_format: DiskFormat = Field(
        DiskFormat.NATIVE, description="How cache files store KV: native (as computed, "
        "lossless), float16, q8 or q4 (MLX affine quantization, groups of 32). Files of "
        "every format are read whatever this is.")
    cache_chunk_tokens: int = Field(
        CHUNK_TOKENS, ge=0, description="Cache files keep their full-attention KV in "
        "content-addressed chunks of this many tokens, so a prefix several agents share "
        "(a system prompt, tools) is on disk once and a new agent starts from it; 0: whole "
        "files. Files stay whole with a Redis cache store.")
    memory_budget_bytes: int | None = Field(
        None, gt=0, description="Memory for model weights. A swap whose target fits beside "
        "the serving model within it loads the target beside it and nobody waits (the dual "
        "path); default three quarters of RAM less the KV budget.")
