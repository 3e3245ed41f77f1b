"""The studio's settings: one object, read from ``STUDIO_*`` environment variables.

The embedded defaults run on one machine with no server: SQLite, a local media folder and
Celery's file-system broker, all under ``var/``. Production points the same settings at
PostgreSQL, Redis and an S3-compatible bucket. This module is the only reader of ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    # Accounts one address may create in any hour (0: no limit), counted in the database like the
    # sign-in throttle. A household or an office behind one address shares it.
    max_signups_per_hour: int = 5
    # Password hashes (argon2: 64 MiB each while it runs) one web process computes at once; a
    # sign-up, sign-in or password change beyond them waits up to password_hash_wait_seconds in the
    # event loop (holding no thread and no database connection), then gets 503 with Retry-After.
    password_hash_slots: int = 2
    password_hash_wait_seconds: float = 10.0
    # Peers whose X-Forwarded-For and X-Forwarded-Proto are believed: addresses or networks of the
    # reverse proxies in front of the web process ("10.0.0.5", "172.16.0.0/12"), as a JSON list or
    # separated by commas. Empty (the default): nobody's, so the address the rate limits count is
    # the peer's own. Anyone who can reach the web port directly can write those headers.
    trusted_proxies: Annotated[list[str], NoDecode] = []

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

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_trusted_proxies(cls, value: Any) -> Any:
        """A JSON list, or addresses separated by commas; each must be an IP address or network."""
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            return value
        entries = [str(entry).strip() for entry in value if str(entry).strip()]
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"STUDIO_TRUSTED_PROXIES: {entry!r} is not an IP address or network (like 10.0.0.5 or "
                    "172.16.0.0/12); list the addresses of your reverse proxies, never everyone"
                ) from None
        return entries

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError("STUDIO_SECRET_KEY must be set to a private random value in production")
        if self.environment == "production" and len(self.secret_key) < 32:
            raise ValueError("STUDIO_SECRET_KEY must be at least 32 characters in production")
        if self.environment == "production" and self.storage_backend == "s3":
            self._check_public_bucket_url()
        if self.password_hash_slots < 1:
            raise ValueError("STUDIO_PASSWORD_HASH_SLOTS must be at least 1")
        return self

    def _check_public_bucket_url(self) -> None:
        """Browsers load gallery images and downloads from signed URLs on the bucket's public
        endpoint: it must be reachable wherever the site is, and be HTTPS when the site is."""
        bucket = urlsplit(self.s3_public_endpoint_url or self.s3_endpoint_url or "")
        site = urlsplit(self.base_url)
        if not bucket.hostname or not site.hostname:
            return
        hint = ("set STUDIO_S3_PUBLIC_ENDPOINT_URL to the address where browsers reach the bucket "
                "(e.g. https://files.your.domain)")
        if _is_loopback(bucket.hostname) and not _is_loopback(site.hostname):
            raise ValueError(
                f"the bucket's public endpoint {bucket.scheme}://{bucket.netloc} is this machine's own "
                f"address, but the site is served at {self.base_url}: remote browsers could not load "
                f"any image; {hint}"
            )
        if site.scheme == "https" and bucket.scheme != "https":
            raise ValueError(
                f"the site is served over HTTPS ({self.base_url}) but the bucket's public endpoint is "
                f"{bucket.scheme}://{bucket.netloc}: browsers block its images as mixed content; {hint}"
            )

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


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
