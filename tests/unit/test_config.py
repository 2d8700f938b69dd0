"""AnalyticsConfig, configure() and the three environment variables the library reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import outbox
from outbox import AnalyticsConfig, OutboxConfigError, OutboxValidationError
from outbox.config import normalise_environment


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("ANALYTICS_DISABLED", "ANALYTICS_ENVIRONMENT", "APP_ENV"):
        monkeypatch.delenv(name, raising=False)
    previous = outbox.get_config()
    yield
    outbox.configure(previous)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("prod", "production"),
        ("Production", "production"),
        (" live ", "production"),
        ("stage", "staging"),
        ("STAGING", "staging"),
        ("preview", "staging"),
        ("dev", "dev"),
        ("local", "dev"),
        ("test", "dev"),
        ("producton", "dev"),  # a typo is never production
        ("", "dev"),
        (None, "dev"),
    ],
)
def test_environment_is_normalised_to_three_values(raw: str | None, expected: str) -> None:
    assert normalise_environment(raw) == expected
    if raw is not None:
        assert AnalyticsConfig(environment=raw).environment == expected


def test_environment_precedence_argument_then_analytics_environment_then_app_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert AnalyticsConfig.from_env().environment == "dev"
    monkeypatch.setenv("APP_ENV", "prod")
    assert AnalyticsConfig.from_env().environment == "production"
    monkeypatch.setenv("ANALYTICS_ENVIRONMENT", "preview")
    assert AnalyticsConfig.from_env().environment == "staging"
    assert AnalyticsConfig.from_env(environment="local").environment == "dev"
    # An empty variable counts as unset.
    monkeypatch.setenv("ANALYTICS_ENVIRONMENT", "  ")
    assert AnalyticsConfig.from_env().environment == "production"


@pytest.mark.parametrize(
    ("raw", "disabled"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False)],
)
def test_analytics_disabled_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str, disabled: bool
) -> None:
    monkeypatch.setenv("ANALYTICS_DISABLED", raw)
    assert AnalyticsConfig.from_env().disabled is disabled
    # The argument wins over the variable.
    assert AnalyticsConfig.from_env(disabled=not disabled).disabled is (not disabled)


def test_unreadable_analytics_disabled_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_DISABLED", "maybe")
    with pytest.raises(OutboxConfigError) as info:
        AnalyticsConfig.from_env()
    assert info.value.setting == "ANALYTICS_DISABLED"


def test_direct_construction_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_DISABLED", "1")
    monkeypatch.setenv("APP_ENV", "production")
    config = AnalyticsConfig()
    assert config.disabled is False and config.environment == "dev"


def test_configure_sets_the_process_wide_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "staging")
    config = outbox.configure(release="1.4.2")
    assert outbox.get_config() is config
    assert (config.environment, config.release) == ("staging", "1.4.2")
    ready = AnalyticsConfig(environment="prod")
    assert outbox.configure(ready) is ready and outbox.get_config() is ready
    with pytest.raises(OutboxConfigError):
        outbox.configure(ready, release="x")
    with pytest.raises(OutboxConfigError) as info:
        outbox.configure(no_such_setting=1)
    assert "no_such_setting" in str(info.value)


def test_standard_properties_are_computed_once_in_order() -> None:
    config = AnalyticsConfig(
        environment="production",
        release="2026.11.1",
        super_properties={"app": "web", "region": None},
    )
    assert dict(config.standard_properties) == {
        "environment": "production",
        "event_schema_version": 1,
        "release": "2026.11.1",
        "$lib": "posthog-outbox",
        "$lib_version": outbox.__version__,
        "app": "web",
    }
    assert "release" not in AnalyticsConfig().standard_properties
    with pytest.raises(TypeError):
        config.standard_properties["x"] = 1  # type: ignore[index]


def test_schema_version_comes_from_the_registry_unless_overridden() -> None:
    registry = outbox.EventRegistry(schema_version=3)
    assert AnalyticsConfig(registry=registry).schema_version == 3
    assert AnalyticsConfig(registry=registry, event_schema_version=4).schema_version == 4
    assert AnalyticsConfig().schema_version == 1


def test_bad_super_properties_are_refused_at_configuration_naming_the_key() -> None:
    with pytest.raises(OutboxValidationError) as info:
        AnalyticsConfig(super_properties={"logo": b"\x89PNG"})
    assert info.value.field == "super_properties.logo"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"strict": True}, "strict"),
        ({"privacy_mode": "everything"}, "privacy_mode"),
        ({"ai_payload_max_chars": 0}, "ai_payload_max_chars"),
        ({"ip_hash_key": "short"}, "ip_hash_key"),
        ({"event_schema_version": 0}, "event_schema_version"),
        ({"release": " "}, "release"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs: dict[str, object], setting: str) -> None:
    with pytest.raises(OutboxConfigError) as info:
        AnalyticsConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.setting == setting


def test_the_ip_hash_key_never_shows_in_repr() -> None:
    config = AnalyticsConfig(ip_hash_key="a-very-secret-key-0123456789")
    assert config.ip_hash_key == b"a-very-secret-key-0123456789"
    assert "secret" not in repr(config)
