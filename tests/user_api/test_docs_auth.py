"""``/docs`` shows how to get a token, and its "Authorize" button works: the
OpenAPI document declares the password flow at ``POST /token`` (whose answer
names the token ``id_token``) on every route that takes a bearer token."""

from __future__ import annotations

from urllib.parse import urljoin

from fastapi import FastAPI
from fastapi.testclient import TestClient

from labcloud.settings import AuthMode
from tests.user_api.helpers import PASSWORD, signup
from user_api.openapi import description, install_docs
from user_api.settings import UserApiSettings


def test_the_document_declares_the_password_flow_at_token(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["passwordAuth"]
    assert scheme["type"] == "oauth2"
    assert scheme["flows"] == {"password": {"tokenUrl": "token", "scopes": {}}}
    assert scheme["x-tokenName"] == "id_token"
    # Relative to the document, as the UI resolves it: the token route.
    assert urljoin("http://testserver/openapi.json", "token") == "http://testserver/token"
    for path, method in (("/jobs", "post"), ("/jobs/{job_id}", "get"), ("/admin/workers", "get")):
        security = schema["paths"][path][method]["security"]
        assert {"bearerAuth": []} in security and {"passwordAuth": []} in security, path
    assert "security" not in schema["paths"]["/token"]["post"]
    assert "**Authorize**" in schema["info"]["description"]
    assert "passwordAuth" in schema["info"]["description"]


def test_docs_answer_and_the_flow_works_as_the_ui_sends_it(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text
    assert '"persistAuthorization": true' in docs.text
    signup(client, "ada@example.org")
    # What the UI posts for the password flow (RFC 6749 section 4.3), client id empty.
    token = client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": "ada@example.org",
            "password": PASSWORD,
            "scope": "",
        },
    )
    assert token.status_code == 201, token.text
    # The field x-tokenName names, sent as a bearer token.
    answer = token.json()
    me = client.get("/user", headers={"Authorization": f"Bearer {answer['id_token']}"})
    assert me.status_code == 200, me.text
    assert me.json()["email"] == "ada@example.org"


def test_cognito_without_token_routes_explains_the_pool(
    user_settings: UserApiSettings,
) -> None:
    cognito = user_settings.model_copy(
        update={"auth": AuthMode.COGNITO, "cognito_auth_routes": False}
    )
    text = description(cognito)
    assert "Cognito user pool named by `GET /access_info`" in text
    assert "passwordAuth" not in text
    app = FastAPI(description=text)
    install_docs(app, cognito)
    assert "passwordAuth" not in app.openapi().get("components", {}).get("securitySchemes", {})
    routes = cognito.model_copy(update={"cognito_auth_routes": True})
    assert "passwordAuth" in description(routes)
    assert "good for" not in description(routes)  # Cognito decides the lifetime


def test_the_description_says_how_to_get_an_account(user_settings: UserApiSettings) -> None:
    assert "sign up with `POST /user`" in description(user_settings)
    closed = user_settings.model_copy(update={"allow_self_signup": False})
    assert "ask an administrator (`labcloud admin`)" in description(closed)
    assert "good for 12 hours" in description(user_settings)
