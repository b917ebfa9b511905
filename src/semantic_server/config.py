"""Every knob of the server, read once from the environment (prefix ``SEMANTIC_``).

One class so that a user can see every setting in one place and a test can build a
server with any combination of them without touching the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]


class Settings(BaseSettings):
    """Server settings; each field is also the environment variable ``SEMANTIC_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SEMANTIC_", extra="ignore")

    # Models
    model: str = Field(
        "smollm2-135m-instruct", description="Model id loaded at startup (see the catalog)."
    )
    models_dir: Path = Field(Path("models"), description="Folder of imported MLX models.")
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
