"""The worker API's whole HTTP surface, walked from its OpenAPI document: every
operation is described and says how it authenticates, no numeric parameter out of
range reaches the database or the clock (OverflowError: 500), and URLs that are
not UTF-8 are refused."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.openapi_probe import numeric_probes, undocumented_operations, unsecured_operations
from tests.worker_api.conftest import INTERNAL, FakeUserApi
from tests.worker_api.test_endpoints import client, make_client  # noqa: F401

PUBLIC = {"/access_info", "/health", "/_signed/{token}"}


def test_every_operation_is_described_and_declares_its_auth(client: TestClient) -> None:  # noqa: F811
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["internalApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "The key the two APIs share (INTERNAL_API_KEY_SECRET).",
    }
    assert undocumented_operations(schema) == []
    assert unsecured_operations(schema, public=PUBLIC) == []
    assert schema["paths"]["/_jobs"]["post"]["security"] == [{"internalApiKey": []}]


def test_numbers_beyond_64_bits_are_refused_everywhere(
    client: TestClient,  # noqa: F811
    fake_user_api: FakeUserApi,
) -> None:
    headers = {**fake_user_api.headers(), **INTERNAL}
    schema = client.get("/openapi.json").json()
    probes = list(numeric_probes(schema))
    assert ("GET", "/jobs", {"memory": "1", "older_than": "9.5e174"}) in probes
    failures = []
    # Server errors as responses (the 500 a worker sees), not as exceptions raised here.
    answering = TestClient(client.app, raise_server_exceptions=False)
    for method, url, query in probes:
        response = answering.request(method, url, params=query, headers=headers)
        if response.status_code >= 500 or response.status_code < 400:
            failures.append((method, url, query, response.status_code, response.text[:200]))
    assert failures == []


def test_urls_that_are_not_utf_8_are_refused(
    client: TestClient,  # noqa: F811
    fake_user_api: FakeUserApi,
) -> None:
    for url in ("/files/%FF/url", "/jobs/1/files/url?type=output&base_path=%C0%AE"):
        response = client.request(
            "POST" if "jobs" in url else "GET", url, headers=fake_user_api.headers()
        )
        assert response.status_code == 400, (url, response.text)
        assert "UTF-8" in response.json()["detail"]
