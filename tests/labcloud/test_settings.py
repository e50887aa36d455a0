"""Loading a service's settings: bad values and missing files are named, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from labcloud.settings import load_settings
from worker_api.settings import WorkerApiSettings

SECRET = "a-secret-value-never-printed-0123"


def test_a_named_env_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"env file not found: .*missing\.env"):
        load_settings(WorkerApiSettings, tmp_path / "missing.env")


def test_values_come_from_the_named_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env_file = tmp_path / "worker-api.env"
    env_file.write_text(
        f"INTERNAL_API_KEY_SECRET={SECRET}\nUSERFACING_API_URL=http://127.0.0.1:8000\n",
        encoding="utf-8",
    )
    settings = load_settings(WorkerApiSettings, env_file)
    assert settings.internal_api_key_secret.get_secret_value() == SECRET
    assert settings.userfacing_api_url == "http://127.0.0.1:8000"


def test_bad_settings_are_named_one_per_line_without_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("INTERNAL_API_KEY_SECRET", SECRET)
    monkeypatch.setenv("MAX_RETRIES", "-1")
    monkeypatch.delenv("USERFACING_API_URL", raising=False)
    with pytest.raises(SystemExit) as exited:
        load_settings(WorkerApiSettings)
    message = str(exited.value.code)
    assert message.startswith("WorkerApiSettings: invalid settings\n")
    assert "  MAX_RETRIES: " in message
    assert "  USERFACING_API_URL: Field required" in message
    assert SECRET not in message
