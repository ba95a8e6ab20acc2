"""Settings: environment variables with the GATEWAY__ prefix, validated at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_gateway.settings import (
    Settings,
    SettingsError,
    load_settings,
    render_env_example,
    unknown_variables,
)

from ..support.processes import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GATEWAY__"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_documented_ones() -> None:
    settings = load_settings(internal_api_key="a-real-key-0123456789")
    assert settings.use_jwt_auth is True
    assert settings.jwt_issuer == "https://auth.codelab.local"
    assert settings.jwt_audience == "codelab-api"
    assert settings.effective_jwks_url == "http://127.0.0.1:8003/.well-known/jwks.json"
    assert settings.log_level == "INFO"
    assert settings.ws_heartbeat_interval == 20
    assert settings.ws_max_message_bytes == 16 * 1024 * 1024
    assert settings.max_queued_messages == 16
    assert settings.session_grace_seconds == 30
    assert settings.drain_timeout == 30
    assert settings.stream_idle_timeout > 360, "well above the runtime's LLM timeout"


def test_values_come_from_gateway_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY__AGENT_URL", "http://runtime:8001/")
    monkeypatch.setenv("GATEWAY__WS_HEARTBEAT_INTERVAL", "7.5")
    monkeypatch.setenv("GATEWAY__LOG_LEVEL", "warning")
    monkeypatch.setenv("GATEWAY__INTERNAL_API_KEY", "k" * 20)
    settings = load_settings()
    assert settings.agent_url == "http://runtime:8001"
    assert settings.ws_heartbeat_interval == 7.5
    assert settings.log_level == "WARNING"


def test_a_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "GATEWAY__MAX_QUEUED_MESSAGES=3\nGATEWAY__INTERNAL_API_KEY=kkkkkkkkkkkkkkkkkkkk\n"
    )
    assert load_settings().max_queued_messages == 3


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("WS_HEARTBEAT_INTERVAL", "abc", "GATEWAY__WS_HEARTBEAT_INTERVAL"),
        ("WS_HEARTBEAT_INTERVAL", "-1", "greater than 0"),
        ("AGENT_URL", "ftp://x", "http:// or https://"),
        ("LOG_LEVEL", "LOUD", "GATEWAY__LOG_LEVEL"),
        ("MAX_QUEUED_MESSAGES", "1.5", "GATEWAY__MAX_QUEUED_MESSAGES"),
        ("INTERNAL_API_KEY", "", "empty, the placeholder"),
        ("INTERNAL_API_KEY", "change-me-internal-key", "empty, the placeholder"),
        ("INTERNAL_API_KEY", " change-me-internal-key ", "empty, the placeholder"),
        ("INTERNAL_API_KEY", "short", "shorter than 16"),
        ("ALLOWED_ORIGINS", "https://ok.example,ftp//bad", "GATEWAY__ALLOWED_ORIGINS"),
        ("JWKS_URL", "file:///etc/passwd", "GATEWAY__JWKS_URL"),
    ],
)
def test_a_bad_value_is_refused_with_a_message_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(f"GATEWAY__{name}", value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert fragment in str(error.value)


def test_the_placeholder_key_is_accepted_in_explicit_insecure_dev_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY__INSECURE_DEV", "true")
    assert load_settings().internal_api_key.get_secret_value() == "change-me-internal-key"


def test_the_internal_key_is_never_shown_in_a_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY__INTERNAL_API_KEY", "s3cr3t-value-0123456789")
    assert "s3cr3t-value" not in repr(load_settings())


def test_env_example_lists_every_setting_with_its_default_and_an_explanation() -> None:
    text = (ROOT / ".env.example").read_text()
    assert text == render_env_example(), "regenerate .env.example (see render_env_example)"
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"\nGATEWAY__{name.upper()}=" in text


async def test_the_cli_reports_a_bad_setting_and_exits_2(tmp_path: Path) -> None:
    env = {"GATEWAY__REQUEST_TIMEOUT": "soon", "PATH": "/usr/bin:/bin"}
    result = await run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "GATEWAY__REQUEST_TIMEOUT" in stderr
    assert "Traceback" not in stderr


def test_unknown_gateway_variables_are_named_with_a_hint(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("GATEWAY__LOG_LEVL=DEBUG\nOTHER=1\n")
    environ = {
        "GATEWAY__USE_JWT_AUTHH": "false",
        "gateway__use_jwt_auth": "true",  # known, in any case
        "GATEWAY__SOMETHING_ELSE": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(environ, env_file) == [
        "GATEWAY__LOG_LEVL (did you mean GATEWAY__LOG_LEVEL?)",
        "GATEWAY__SOMETHING_ELSE",
        "GATEWAY__USE_JWT_AUTHH (did you mean GATEWAY__USE_JWT_AUTH?)",
    ]
    assert unknown_variables({"GATEWAY__PORT": "1"}, tmp_path / "missing") == []
