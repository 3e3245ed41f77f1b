"""docker-compose.yml: valid for Debian's docker-compose, every service present and health-checked,
the GPU reserved for the worker, secrets required, and an environment the studio accepts in production."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = "/usr/bin/docker-compose"
REQUIRED_ENV = {
    "STUDIO_SECRET_KEY": "a-test-secret-that-is-long-enough-0123456789",
    "POSTGRES_PASSWORD": "pg-test-password",
    "MINIO_ROOT_PASSWORD": "minio-test-password",
}
LONG_RUNNING = ("postgres", "redis", "minio", "mailpit", "web", "worker", "cpu-worker", "beat")
ONE_SHOT = ("createbucket", "migrate")

pytestmark = pytest.mark.skipif(
    shutil.which(COMPOSE) is None and shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (apt-get install docker-compose); the CI installs it",
)


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = COMPOSE if Path(COMPOSE).exists() else str(shutil.which("docker-compose"))
    base_env = {key: value for key, value in os.environ.items() if key not in REQUIRED_ENV and
                not key.startswith("STUDIO_")}
    return subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), *args],
        cwd=ROOT, env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose("config", env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def test_config_is_valid() -> None:
    result = compose("config", "-q", env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_secrets_are_required(missing: str) -> None:
    env = {key: value for key, value in REQUIRED_ENV.items() if key != missing}
    result = compose("config", "-q", env=env)
    assert result.returncode != 0
    assert missing in result.stderr


def test_every_service_is_there(config: dict[str, Any]) -> None:
    assert set(LONG_RUNNING) | set(ONE_SHOT) <= set(config["services"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_health_checks(config: dict[str, Any], name: str) -> None:
    service = config["services"][name]
    assert service["healthcheck"]["test"], name
    assert service.get("restart") == "unless-stopped"


def test_the_worker_reserves_one_gpu_and_takes_one_job(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = worker["command"]
    assert command[command.index("-Q") + 1] == "gpu" and command[command.index("-c") + 1] == "1"
    assert "cu" in worker["build"]["args"]["TORCH_INDEX_URL"]  # a CUDA build of torch, not the CPU one
    assert "gpu" not in str(config["services"]["cpu-worker"].get("deploy", ""))


def test_redis_keeps_its_queues_across_a_restart(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    # The append-only file outlives the container: a named volume on /data ("redis-data:/data:rw").
    assert any(str(volume).split(":")[1] == "/data" for volume in redis["volumes"])


def test_start_order(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "cpu-worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["web"]["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"


def web_settings(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the web container would read from its environment in ``config``."""
    environment = config["services"]["web"]["environment"]
    for key in list(os.environ):
        if key.startswith("STUDIO_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, "" if value is None else str(value))
    return Settings(_env_file=None)  # type: ignore[call-arg]


def config_with(**env: str) -> dict[str, Any]:
    result = compose("config", env={**REQUIRED_ENV, **env})
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def test_the_environment_is_valid_production_settings(config: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = web_settings(config, monkeypatch)
    assert settings.environment == "production"
    assert settings.secret_key == REQUIRED_ENV["STUDIO_SECRET_KEY"]
    assert settings.resolved_database_url.startswith("postgresql+psycopg://studio:pg-test-password@postgres")
    assert settings.resolved_broker_url == "redis://redis:6379/0"
    assert settings.storage_backend == "s3" and settings.s3_secret_key == REQUIRED_ENV["MINIO_ROOT_PASSWORD"]
    assert "localhost" in settings.allowed_hosts  # the web health check's Host


def test_the_dockerfile_takes_the_torch_index_as_a_build_argument() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("FROM python:3.11-slim") == 1
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}"' in dockerfile
    assert "USER studio" in dockerfile


def test_sign_ups_are_closed_unless_the_operator_opens_them(config: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert web_settings(config, monkeypatch).signups_open is False
    assert web_settings(config_with(STUDIO_SIGNUPS_OPEN="true"), monkeypatch).signups_open is True


def test_forwarded_headers_are_believed_from_configured_proxies_only(config: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in config["services"].items():
        assert "FORWARDED_ALLOW_IPS" not in (service.get("environment") or {}), name
    # `studio web` runs uvicorn without its own proxy-header handling (app.cli.WEB_SERVER_OPTIONS).
    assert config["services"]["web"]["command"][:2] == ["studio", "web"]
    assert web_settings(config, monkeypatch).trusted_proxies == []
    behind_proxy = config_with(STUDIO_TRUSTED_PROXIES='["172.16.0.0/12"]', STUDIO_PORT="127.0.0.1:8000")
    assert web_settings(behind_proxy, monkeypatch).trusted_proxies == ["172.16.0.0/12"]
    assert behind_proxy["services"]["web"]["ports"] == ["127.0.0.1:8000:8000/tcp"]


def test_browsers_elsewhere_get_the_bucket_address_the_operator_sets(config: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    local = web_settings(config, monkeypatch)  # a browser on this machine: localhost for both
    assert (local.base_url, local.s3_public_endpoint_url) == ("http://localhost:8000", "http://localhost:9000")
    # The site moved to a domain but the bucket did not: the web app refuses to start, and says why.
    with pytest.raises(ValueError, match="STUDIO_S3_PUBLIC_ENDPOINT_URL"):
        web_settings(config_with(STUDIO_BASE_URL="https://studio.example.com"), monkeypatch)
    with pytest.raises(ValueError, match="mixed content"):
        web_settings(config_with(STUDIO_BASE_URL="https://studio.example.com",
                                 STUDIO_S3_PUBLIC_ENDPOINT_URL="http://files.example.com"), monkeypatch)
    remote = web_settings(config_with(STUDIO_BASE_URL="https://studio.example.com",
                                      STUDIO_S3_PUBLIC_ENDPOINT_URL="https://files.example.com"), monkeypatch)
    assert remote.s3_public_endpoint_url == "https://files.example.com"
    assert remote.s3_endpoint_url == "http://minio:9000"  # the app itself still talks to the bucket inside


def test_mail_goes_to_the_catcher_unless_the_operator_names_a_server(config: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    caught = web_settings(config, monkeypatch)
    assert (caught.smtp_host, caught.smtp_port, caught.smtp_tls) == ("mailpit", 1025, "none")
    assert config["services"]["mailpit"]["ports"][0].startswith("127.0.0.1:8025:8025")
    real = web_settings(config_with(STUDIO_SMTP_HOST="smtp.example.com", STUDIO_SMTP_PORT="587",
                                    STUDIO_SMTP_TLS="starttls", STUDIO_SMTP_USER="studio"), monkeypatch)
    assert (real.smtp_host, real.smtp_port, real.smtp_tls, real.smtp_user) == ("smtp.example.com", 587, "starttls",
                                                                                "studio")
