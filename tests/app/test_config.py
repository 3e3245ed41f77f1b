"""Settings that guard the studio against its own configuration: forwarded addresses, the bucket's public address."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings

PRODUCTION = {"environment": "production", "secret_key": "a-production-secret-of-at-least-32-chars",
              "storage_backend": "s3", "s3_endpoint_url": "http://minio:9000"}


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(("value", "expected"), [
    ("", []),
    ("10.0.0.5", ["10.0.0.5"]),
    ("10.0.0.5, 172.16.0.0/12", ["10.0.0.5", "172.16.0.0/12"]),
    ('["10.0.0.5", "::1"]', ["10.0.0.5", "::1"]),
])
def test_trusted_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                              expected: list[str]) -> None:
    assert from_env(monkeypatch, STUDIO_TRUSTED_PROXIES=value).trusted_proxies == expected


@pytest.mark.parametrize("value", ["*", "proxy.internal", "10.0.0.0/33"])
def test_trusted_proxies_are_addresses_or_networks_never_everyone(monkeypatch: pytest.MonkeyPatch,
                                                                  value: str) -> None:
    with pytest.raises(ValidationError, match="STUDIO_TRUSTED_PROXIES: .* is not an IP address or network"):
        from_env(monkeypatch, STUDIO_TRUSTED_PROXIES=value)


def test_nothing_is_trusted_by_default() -> None:
    assert Settings(_env_file=None).trusted_proxies == []  # type: ignore[call-arg]


@pytest.mark.parametrize(("base_url", "public", "problem"), [
    ("https://studio.example.com", None, "this machine's own address"),  # no public endpoint: the app's own
    ("http://192.0.2.10:8000", "http://localhost:9000", "this machine's own address"),
    ("https://studio.example.com", "http://127.0.0.1:9000", "this machine's own address"),
    ("https://studio.example.com", "http://files.example.com", "mixed content"),
])
def test_production_refuses_a_bucket_address_browsers_cannot_use(base_url: str, public: str | None,
                                                                 problem: str) -> None:
    values = {**PRODUCTION, "base_url": base_url, "s3_public_endpoint_url": public}
    if public is None:
        values["s3_endpoint_url"] = "http://localhost:9000"
    with pytest.raises(ValidationError, match=problem) as refused:
        Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]
    assert "STUDIO_S3_PUBLIC_ENDPOINT_URL" in str(refused.value)


@pytest.mark.parametrize(("base_url", "public"), [
    ("http://localhost:8000", "http://localhost:9000"),  # a trial on one machine
    ("https://studio.example.com", "https://files.example.com"),
    ("http://192.0.2.10:8000", "http://192.0.2.10:9000"),
])
def test_production_accepts_a_bucket_address_browsers_can_use(base_url: str, public: str) -> None:
    settings = Settings(_env_file=None, **{**PRODUCTION, "base_url": base_url,  # type: ignore[call-arg, arg-type]
                                           "s3_public_endpoint_url": public})
    assert settings.s3_public_endpoint_url == public


def test_development_does_not_check_the_bucket_address() -> None:
    settings = Settings(_env_file=None, base_url="https://studio.example.com",  # type: ignore[call-arg]
                        storage_backend="s3", s3_endpoint_url="http://localhost:9000")
    assert settings.environment == "development"
