"""One typed settings object, read from `KOLORS_FARM_*` environment variables."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the farm; see the README's environment table."""

    model_config = SettingsConfigDict(env_prefix="KOLORS_FARM_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    redis_url: str | None = None
    storage_url: str | None = None
    model: str = "Kwai-Kolors/Kolors-diffusers"
    public_base_url: str | None = Field(
        default=None, description="Base for absolute URLs in responses; else the request's host."
    )

    # API
    sync_timeout_s: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)

    # Worker
    device: str = "auto"
    dtype: str = Field(default="auto", pattern="^(auto|float32|float16|bfloat16)$")
    render_batch_size: int = Field(default=1, ge=1, le=10)
    channels_last: bool = Field(default=False, description="UNet and VAE in channels-last layout.")
    compile_unet: bool = Field(default=False, description="torch.compile the UNet at start.")
    text_encoder_offload: bool = Field(
        default=False, description="Keep models on the host and move each to the GPU to run."
    )
    warmup: bool = Field(default=True, description="Render a throwaway image before serving.")
    vae_tiling_above_pixels: int = Field(default=1536 * 1536, ge=0)
    memory_per_megapixel_mb: int = Field(default=1600, gt=0)
    memory_reserve_mb: int = Field(default=2048, ge=0)
    visibility_timeout_s: int = Field(default=4 * 3600, gt=0)
    progress_interval_s: float = Field(default=0.5, ge=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)

    # Scheduling: the database decides what runs next; see the README's design section.
    lease_s: float = Field(default=60.0, gt=0, description="A claim's lease, renewed every third.")
    max_attempts: int = Field(default=3, ge=1)
    dispatch_margin: int = Field(default=1, ge=0)
    dispatch_interval_s: float = Field(default=1.0, gt=0, le=5)
    redispatch_after_s: float = Field(default=30.0, gt=0)
    max_queued_per_user: int = Field(default=1000, ge=1)
    max_running_per_user: int = Field(default=0, ge=0, description="0: no cap.")
    max_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    db_retry_s: float = Field(
        default=120.0, ge=0, description="How long a worker retries a write while the DB is down."
    )
    store_retry_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a worker retries storing an image while the store is unreachable.",
    )

    # Results: link lifetimes and retention.
    url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    url_signing_key: SecretStr | None = Field(
        default=None, description="Signs local-disk result links; generated under the data dir."
    )
    result_retention_s: int = Field(default=7 * 24 * 3600, gt=0)
    min_retention_s: int = Field(default=3600, gt=0)
    max_retention_s: int = Field(default=30 * 24 * 3600, gt=0)
    cleanup_interval_s: float = Field(default=60.0, gt=0)

    # Credits: the price of one 1024x1024 image at 25 steps, in credits.
    price_per_image: Decimal = Field(default=Decimal("1"), ge=0)

    # Result cache: identical requests answered from retained images (see shared/jobs/cache.py).
    cache: bool = Field(default=True, description="Answer identical requests from storage.")
    cache_scope: Literal["tenant", "farm"] = Field(
        default="tenant", description="Whose images may answer: the tenant's own, or anyone's."
    )
    cache_price_fraction: Decimal = Field(
        default=Decimal("0"), ge=0, le=1, description="A cached image's share of the price."
    )

    # Monitoring: GET /metrics asks for this bearer token when set (else it is open).
    metrics_token: SecretStr | None = None

    # Progress stream: event streams one API process serves (each holds one of its threads,
    # on top of --threads), the keep-alive comment's period, and how often an open stream
    # re-reads its job's row (queue position; an end that Redis never announced).
    stream_max_per_process: int = Field(default=1000, ge=1, le=20000)
    stream_heartbeat_s: float = Field(default=15.0, gt=0)
    stream_recheck_s: float = Field(default=30.0, gt=0)

    # Idempotency: how long an `Idempotency-Key` names its request (then it is new again).
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)

    # Webhooks: retry schedule (comma-separated seconds), networks allowed despite the
    # private-address guard (comma-separated CIDRs), and the delivery worker's knobs.
    webhook_backoff_s: str = Field(
        default="5,300,1800,7200,18000,36000,36000", pattern=r"^\s*[0-9.]+(\s*,\s*[0-9.]+)*\s*$"
    )
    webhook_allow_nets: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    webhook_lease_s: float = Field(
        default=60.0, gt=0, description="A claimed delivery is swept again after this."
    )
    webhook_sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    webhook_concurrency: int = Field(default=8, ge=1, le=256)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Child processes may run from another directory; resolve once here.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _retention_bounds(self) -> Settings:
        if not self.min_retention_s <= self.result_retention_s <= self.max_retention_s:
            raise ValueError(
                "KOLORS_FARM_RESULT_RETENTION_S must lie between the MIN and MAX retention"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to SQLite under the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'farm.db'}"

    @property
    def resolved_storage_url(self) -> str:
        """The result storage URL, defaulting to local disk under the data dir."""
        return self.storage_url or f"file://{self.data_dir / 'results'}"

    @property
    def tiny_model_dir(self) -> Path:
        """Where `KOLORS_FARM_MODEL=tiny` builds and caches its checkpoint."""
        return self.data_dir / "models" / "tiny"

    def require_redis_url(self) -> str:
        """The Redis URL, or a clear error where the process needs one and none is set."""
        if not self.redis_url:
            raise RuntimeError(
                "KOLORS_FARM_REDIS_URL is not set (only `kolors-farm up` starts a private Redis)"
            )
        return self.redis_url
