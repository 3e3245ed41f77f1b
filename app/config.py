"""The studio's settings: one object, read from ``STUDIO_*`` environment variables.

The embedded defaults run on one machine with no server: SQLite, a local media folder and
Celery's file-system broker, all under ``var/``. Production points the same settings at
PostgreSQL, Redis and an S3-compatible bucket. This module is the only reader of ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SECRET_KEY = "dev-only-secret-key-change-me"
BASE_MODEL_KEY = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
MAX_BASE_MODEL_NAME = 80


class BaseModelOption(BaseModel):
    """One base model the operator offers (an entry of ``STUDIO_BASE_MODELS``).

    ``key`` is the stable id a studio records and the API's ``base_model`` field names; ``name`` is
    what people read; ``spec`` is what the worker loads (a hub id, a local diffusers folder, a single
    ``.safetensors`` file, or a built-in name such as ``tiny``); ``licence`` is the model's licence
    as people know it ("CreativeML Open RAIL++-M"), with an optional ``licence_url``. The family
    (SD 1.x/2.x, SDXL, ...) is never written here: the worker detects it from what it loads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    name: str
    spec: str
    licence: str
    licence_url: str | None = None


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
    # The base models people choose from when they create a studio, as a JSON list of
    # {key, name, spec, licence, licence_url}; the first is the default. Empty: the one model above
    # (``base_model``, or the worker's default) and no choice on the form.
    base_models: Annotated[list[BaseModelOption], NoDecode] = []
    max_attempts: int = 3
    lease_seconds: int = 120
    heartbeat_seconds: int = 10
    task_soft_time_limit: int = 3 * 3600
    task_hard_time_limit: int = 3 * 3600 + 300
    # A queued job sent this long ago that has not started is sent again, when the broker cannot be
    # read (the file-system broker) or a worker took its message and never acknowledged it. With
    # Redis, a message the broker lost is found and re-sent by the reaper's next pass instead.
    queued_resend_seconds: int = 15 * 60
    max_active_jobs_per_user: int = 2
    # Studios one account may create in any hour (0: no limit); deleting one does not give it back.
    max_studios_per_hour: int = 10
    retention_days: int = 30
    delete_photos_after_training: bool = True
    # The operator console and monitoring (app/operator): a worker whose last heartbeat is older than
    # this is shown as lost and does not count for /readyz.
    worker_lost_seconds: int = 60
    # /metrics answers only a request with "Authorization: Bearer <this token>"; empty: no /metrics.
    metrics_token: str = ""
    # One JSON object per log line (with job and account ids), for a log stack to index.
    log_json: bool = False

    # Email. ``smtp_host`` empty (the embedded default): each message is written as an .eml file under
    # ``var/mail`` and one line is logged, so a studio on one machine needs no mail server. Otherwise
    # messages go to that server: ``smtp_tls`` "starttls" (port 587), "ssl" (port 465) or "none"
    # (a catcher on a private network only), logging in when ``smtp_user`` is set.
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_tls: Literal["starttls", "ssl", "none"] = "starttls"
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_timeout_seconds: float = 30.0
    mail_from: str = "Studio <studio@localhost>"
    # True: an account must confirm its address before it can start a training (the rest of the
    # studio works without). For a studio open to sign-ups, so every GPU hour has a reachable owner.
    require_verified_email: bool = False
    email_verification_hours: int = 48
    password_reset_minutes: int = 60
    # How long the link to a data export ("export my data") works; the ZIP is removed after it.
    export_link_hours: int = 24

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

    @field_validator("base_models", mode="before")
    @classmethod
    def _parse_base_models(cls, value: Any) -> Any:
        """A JSON list of entries; each is checked on its own, and every error names its entry."""
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"STUDIO_BASE_MODELS is not valid JSON ({error}); write a list like "
                                 '[{"key": "sdxl", "name": "SDXL 1.0", '
                                 '"spec": "stabilityai/stable-diffusion-xl-base-1.0", '
                                 '"licence": "CreativeML Open RAIL++-M"}]') from None
        if not isinstance(value, list):
            raise ValueError("STUDIO_BASE_MODELS must be a JSON list of models, each "
                             "{key, name, spec, licence, licence_url}")
        return [_base_model_option(position, entry) for position, entry in enumerate(value, start=1)]

    @field_validator("base_models")
    @classmethod
    def _unique_base_model_keys(cls, value: list[BaseModelOption]) -> list[BaseModelOption]:
        seen: dict[str, int] = {}
        for position, option in enumerate(value, start=1):
            if option.key in seen:
                raise ValueError(f"STUDIO_BASE_MODELS entries {seen[option.key]} and {position} both have the key "
                                 f"{option.key!r}; each model needs its own key")
            seen[option.key] = position
        return value

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

    @property
    def mail_dir(self) -> Path:
        """Where messages are written as .eml files when no SMTP server is set (``smtp_host`` empty)."""
        return (self.var_dir / "mail").resolve()


def _base_model_option(position: int, entry: Any) -> BaseModelOption:
    """Entry ``position`` (1-based) of STUDIO_BASE_MODELS, checked; ValueError naming it when it is bad."""
    if isinstance(entry, BaseModelOption):
        return entry
    where = f"STUDIO_BASE_MODELS entry {position}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object like {{\"key\": ..., \"name\": ..., \"spec\": ..., "
                         f"\"licence\": ...}}")
    key = entry.get("key")
    if isinstance(key, str) and key:
        where += f" ({key!r})"
    problems: list[str] = []
    for field in ("key", "name", "spec", "licence"):
        if not isinstance(entry.get(field), str) or not entry[field].strip():
            problems.append(f"{field} is {'empty' if field in entry else 'missing'}")
    unknown = sorted(set(entry) - set(BaseModelOption.model_fields))
    if unknown:
        problems.append(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"(the fields are {', '.join(BaseModelOption.model_fields)})")
    if isinstance(key, str) and key and not BASE_MODEL_KEY.fullmatch(key):
        problems.append("key must be 1-40 lowercase letters, digits, '.', '-' or '_', starting with a letter "
                        "or digit (it is the id studios record; keep it stable)")
    name = entry.get("name")
    if isinstance(name, str) and len(name.strip()) > MAX_BASE_MODEL_NAME:
        problems.append(f"name is longer than {MAX_BASE_MODEL_NAME} characters")
    url = entry.get("licence_url")
    if url is not None and (not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https")
                            or not urlsplit(url).netloc):
        problems.append("licence_url must be an http(s) address")
    if problems:
        hint = (" (spec is what the worker loads: a hub id, a local diffusers folder, a .safetensors file or a "
                "built-in name such as tiny)") if any(p.startswith("spec") for p in problems) else ""
        raise ValueError(f"{where}: {'; '.join(problems)}{hint}")
    try:
        return BaseModelOption(key=str(key), name=" ".join(entry["name"].split()), spec=entry["spec"].strip(),
                               licence=" ".join(entry["licence"].split()), licence_url=url or None)
    except ValidationError as error:  # pragma: no cover - every field was checked above
        raise ValueError(f"{where}: {error}") from None


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
