"""Helpers for user API tests."""

from __future__ import annotations

from fastapi.testclient import TestClient

PASSWORD = "correct-horse-1"


def signup(client: TestClient, email: str) -> dict[str, str]:
    """Create a user account and return its Authorization header."""
    created = client.post("/user", data={"username": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    return login(client, email)


def login(client: TestClient, email: str, password: str = PASSWORD) -> dict[str, str]:
    token = client.post("/token", data={"username": email, "password": password})
    assert token.status_code == 201, token.text
    return {"Authorization": f"Bearer {token.json()['id_token']}"}
