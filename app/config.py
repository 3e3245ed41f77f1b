"""The studio's settings: one object, read from ``STUDIO_*`` environment variables.

The embedded defaults run on one machine with no server: SQLite, a local media folder and
Celery's file-system broker, all under ``var/``. Production points the same settings at
PostgreSQL, Redis and an S3-compatible bucket. This module is the only reader of ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_KEY = "dev-only-secret-key-change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STUDIO_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    secret_key: str = DEFAULT_SECRET_KEY
    var_dir: Path = Path("var")
    base_url: str = "http://127.0.0.1:8000"
    allowed_hosts: list[str] = ["*"]
    cookie_secure: bool = False
    session_days: int = 30
    # False closes the sign-up page and API: only `studio createuser` makes accounts. For a studio
    # that others can reach, whose GPUs and storage the operator pays for.
    signups_open: bool = True

    # Data, queue, storage. Empty means "the embedded default under var_dir".
    database_url: str = ""
    # Connections per process. At most pool_size requests (and at most half of all connections,
    # as a page may hold two sessions) work at once; a burst waits in the event loop instead of
    # deadlocking threads that hold connections while others wait for one (app.main.request_slots).
    database_pool_size: int = 10
    database_max_overflow: int = 20
    broker_url: str = ""
    storage_backend: Literal["local", "s3"] = "local"
    media_dir: Path | None = None
    s3_endpoint_url: str | None = None
    # Where browsers reach the bucket when the app reaches it at an internal address (compose: minio:9000).
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "studio"
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    signed_url_seconds: int = 300

    # Uploads.
    min_photos: int = 3
    max_photos: int = 20
    max_photo_bytes: int = 25 * 1024 * 1024
    # A ceiling for any request body; uploads are held to request_body_limit (their photos' sizes).
    max_request_bytes: int = 20 * 25 * 1024 * 1024 + 1024 * 1024
    max_image_pixels: int = 50_000_000
    # Memory one photo's decoding may take (the pixel limit per format follows from it, see
    # app.photos.sanitize.decode_memory), and the CPU time after which a decode is stopped. Measured
    # in docs/benchmarks.md (bench/web.py --only uploads): the worst upload of each format then grows
    # the web process by under 300 MB and costs under 2 s of CPU on a 2-core box.
    max_decode_bytes: int = 256 * 1024 * 1024
    max_decode_cpu_seconds: float = 3.0
    # Photos decoded at once per web process; more wait their turn without holding a database session.
    upload_decode_concurrency: int = 2
    # A request body that sends nothing for this long is dropped (408), so a stalled upload frees its
    # connection.
    request_body_timeout_seconds: float = 30.0
    max_prompts: int = 20
    max_images_per_prompt: int = 8

    # Jobs. ``base_model`` empty: the worker picks (the tiny demo model without CUDA).
    base_model: str = ""
    max_attempts: int = 3
    lease_seconds: int = 120
    heartbeat_seconds: int = 10
    task_soft_time_limit: int = 3 * 3600
    task_hard_time_limit: int = 3 * 3600 + 300
    max_active_jobs_per_user: int = 2
    # Studios one account may create in any hour (0: no limit); deleting one does not give it back.
    max_studios_per_hour: int = 10
    retention_days: int = 30
    delete_photos_after_training: bool = True

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError("STUDIO_SECRET_KEY must be set to a private random value in production")
        if self.environment == "production" and len(self.secret_key) < 32:
            raise ValueError("STUDIO_SECRET_KEY must be at least 32 characters in production")
        return self

    @property
    def visibility_timeout(self) -> int:
        """Redis re-delivers unacknowledged tasks after this; twice the hard limit so a live job never runs twice."""
        return 2 * self.task_hard_time_limit

    @property
    def request_body_limit(self) -> int:
        """The largest request body accepted: every photo at its limit plus 1 MiB for the form's fields
        and multipart framing, and never above max_request_bytes. Refused from Content-Length alone."""
        return min(self.max_request_bytes, self.max_photos * self.max_photo_bytes + 1024 * 1024)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'studio.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.var_dir / "broker").resolve()

    @property
    def resolved_media_dir(self) -> Path:
        return (self.media_dir or self.var_dir / "media").resolve()

    @property
    def scratch_dir(self) -> Path:
        return (self.var_dir / "scratch").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
