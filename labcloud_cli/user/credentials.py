"""Where ``labcloud login`` keeps its tokens: one JSON file in the user's config folder
(``$XDG_CONFIG_HOME/labcloud/credentials.json``, else ``~/.config/labcloud/...``),
readable by its owner only, holding one login per server URL and the URL logged in to
last (the server the other commands talk to when no ``--url`` is given)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labcloud_cli.errors import NotLoggedIn


@dataclass(frozen=True)
class Login:
    """A token for one server: whose it is and when it stops working."""

    url: str
    email: str
    id_token: str
    expires_at: str  # ISO 8601, UTC

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= datetime.fromisoformat(self.expires_at)


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "labcloud"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")


def _read() -> dict[str, Any]:
    path = credentials_path()
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "logins": {}}
    except (OSError, ValueError) as exc:
        raise NotLoggedIn(f"cannot read {path} ({exc}); log in again: labcloud login") from exc
    data.setdefault("logins", {})
    data.setdefault("current", None)
    return data


def _write(data: dict[str, Any]) -> None:
    folder = config_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    target = credentials_path()
    # Written whole to a new file, created owner-only (never readable by others,
    # not even for a moment), then renamed over the old one.
    temporary = folder / f".credentials.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle, indent=2)
    temporary.replace(target)


def save(login: Login) -> None:
    """Keep ``login`` and make its server the default one."""
    data = _read()
    data["logins"][login.url] = asdict(login)
    data["current"] = login.url
    _write(data)


def forget(url: str) -> bool:
    """Drop the login for ``url``; whether there was one."""
    data = _read()
    url = normalise_url(url)
    if data["logins"].pop(url, None) is None:
        return False
    if data["current"] == url:
        data["current"] = None
    _write(data)
    return True


def server_url(given: str | None) -> str:
    """The server to talk to: ``--url``/``LABCLOUD_URL`` if given, else the one
    logged in to last."""
    if given:
        return normalise_url(given)
    current: str | None = _read()["current"]
    if not current:
        raise NotLoggedIn("not logged in: labcloud login --url https://your-labcloud-server")
    return current


def login_for(url: str) -> Login:
    """The saved login for ``url``, still valid."""
    found = _read()["logins"].get(normalise_url(url))
    if found is None:
        raise NotLoggedIn(f"not logged in to {url}: labcloud login --url {url}")
    login = Login(**found)
    if login.expired():
        raise NotLoggedIn(
            f"your login to {url} as {login.email} expired; log in again: "
            f"labcloud login --url {url}"
        )
    return login
