"""Settings that guard the studio against its own configuration: forwarded addresses, the bucket's public address."""

from __future__ import annotations

import json

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


SDXL_ENTRY = {"key": "sdxl", "name": "SDXL 1.0", "spec": "stabilityai/stable-diffusion-xl-base-1.0",
              "licence": "CreativeML Open RAIL++-M", "licence_url": "https://huggingface.co/stabilityai/"}
TINY_ENTRY = {"key": "tiny", "name": "Demo", "spec": "tiny", "licence": "MIT"}


def test_base_models_are_a_json_list_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [SDXL_ENTRY, {**TINY_ENTRY, "name": " Demo  model "}]
    settings = from_env(monkeypatch, STUDIO_BASE_MODELS=json.dumps(entries))
    assert [(model.key, model.name, model.spec) for model in settings.base_models] == [
        ("sdxl", "SDXL 1.0", "stabilityai/stable-diffusion-xl-base-1.0"), ("tiny", "Demo model", "tiny")]
    assert settings.base_models[0].licence_url == "https://huggingface.co/stabilityai/"
    assert settings.base_models[1].licence_url is None
    assert from_env(monkeypatch, STUDIO_BASE_MODELS="").base_models == []


def test_without_a_list_the_single_base_model_setting_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, STUDIO_BASE_MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert settings.base_models == [] and settings.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize(("entries", "message"), [
    ([SDXL_ENTRY, {**TINY_ENTRY, "key": "sdxl"}], "entries 1 and 2 both have the key 'sdxl'"),
    ([SDXL_ENTRY, {**TINY_ENTRY, "spec": "  "}], r"entry 2 \('tiny'\): spec is empty .*a hub id, a local diffusers"),
    ([{**TINY_ENTRY, "licence": ""}], r"entry 1 \('tiny'\): licence is empty"),
    ([{key: value for key, value in TINY_ENTRY.items() if key != "name"}], r"entry 1 \('tiny'\): name is missing"),
    ([{**TINY_ENTRY, "key": "SD 1.5"}], r"entry 1 \('SD 1.5'\): key must be 1-40 lowercase letters"),
    ([{**TINY_ENTRY, "license": "MIT"}], r"unknown field 'license' \(the fields are key, name, spec, licence"),
    ([{**TINY_ENTRY, "licence_url": "javascript:alert(1)"}], "licence_url must be an http"),
    (["tiny"], "entry 1 is not an object"),
    ({"tiny": TINY_ENTRY}, "must be a JSON list"),
])
def test_bad_base_models_are_refused_naming_the_entry(monkeypatch: pytest.MonkeyPatch, entries: object,
                                                      message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        from_env(monkeypatch, STUDIO_BASE_MODELS=json.dumps(entries))


def test_base_models_that_are_not_json_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="STUDIO_BASE_MODELS is not valid JSON"):
        from_env(monkeypatch, STUDIO_BASE_MODELS="tiny,tiny-sdxl")
