"""The user API's whole HTTP surface, walked from its OpenAPI document: every
operation is described and says how it authenticates, and no numeric parameter
out of range reaches the database (it used to raise OverflowError: 500)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.openapi_probe import numeric_probes, undocumented_operations, unsecured_operations
from tests.user_api.helpers import login, signup

PUBLIC = {"/access_info", "/token", "/login", "/health", "/_signed/{token}"}


def test_every_operation_is_described_and_declares_its_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An ID token: POST /token (local accounts) or Cognito.",
    }
    assert undocumented_operations(schema) == []
    assert unsecured_operations(schema, public=PUBLIC) == []
    assert schema["paths"]["/jobs"]["post"]["security"] == [
        {"bearerAuth": []},
        {"passwordAuth": []},
    ]
    # /user: anonymous self-signup, or an admin creating any account.
    assert {"bearerAuth": []} in schema["paths"]["/user"]["post"]["security"]


def test_numbers_beyond_64_bits_are_refused_everywhere(client: TestClient) -> None:
    signup(client, "ada@example.org")
    key = client.app.state.settings.internal_api_key_secret.get_secret_value()  # type: ignore[attr-defined]
    headers = {**login(client, "admin@example.org"), "x-api-key": key}
    schema = client.get("/openapi.json").json()
    probes = list(numeric_probes(schema))
    assert any(url == "/jobs/9223372036854775808" for _, url, _ in probes)
    failures = []
    # Server errors as responses (the 500 a user sees), not as exceptions raised here.
    answering = TestClient(client.app, raise_server_exceptions=False)
    for method, url, query in probes:
        response = answering.request(method, url, params=query, headers=headers)
        if response.status_code >= 500 or response.status_code < 400:
            failures.append((method, url, query, response.status_code, response.text[:200]))
    assert failures == []
