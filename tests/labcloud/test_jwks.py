"""Signing keys from a JWKS endpoint (``JwksKeys``), served on loopback: fetched
once, fetched again for a key the set lacks but at most once per interval, and
an endpoint that is down or hangs answered with a refusal, not a stuck request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

from labcloud.auth.jwt import JwksKeys, JwtVerifier
from labcloud.auth.local import (
    GROUPS_CLAIM,
    LOCAL_ALGORITHMS,
    LOCAL_AUDIENCE,
    LOCAL_ISSUER,
    LocalTokenIssuer,
    generate_private_key_pem,
)
from labcloud.auth.principal import InvalidToken


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0
    fetches: int = 0
    url: str = ""


@pytest.fixture
def server() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            state.fetches += 1
            time.sleep(state.delay)
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def issuer() -> LocalTokenIssuer:
    return LocalTokenIssuer(generate_private_key_pem(), lifetime_seconds=600)


def verifier(keys: JwksKeys) -> JwtVerifier:
    return JwtVerifier(
        key_resolver=keys,
        issuer=LOCAL_ISSUER,
        audience=LOCAL_AUDIENCE,
        algorithms=LOCAL_ALGORITHMS,
        groups_claim=GROUPS_CLAIM,
        name_claims=("email",),
    )


def token(of: LocalTokenIssuer, n: int = 0) -> str:
    return of.issue(subject=f"s{n}", email=f"u{n}@example.org", groups=["users"])


def test_keys_are_fetched_once(server: JwksServer) -> None:
    first = issuer()
    server.keys = first.jwks()["keys"]
    check = verifier(JwksKeys(server.url))
    for n in range(5):
        assert check.verify(token(first, n)).subject == f"s{n}"
    assert server.fetches == 1


def test_an_unknown_key_is_fetched_again_at_most_once_per_interval(server: JwksServer) -> None:
    old, new = issuer(), issuer()
    server.keys = old.jwks()["keys"]
    keys = JwksKeys(server.url, refresh_interval=0.3)
    check = verifier(keys)
    check.verify(token(old))
    server.keys = old.jwks()["keys"] + new.jwks()["keys"]  # the issuer rotates
    with pytest.raises(InvalidToken, match="unknown signing key"):
        check.verify(token(new))  # right after a fetch: not fetched again yet
    assert server.fetches == 1
    time.sleep(0.35)
    assert check.verify(token(new, 1)).subject == "s1"
    assert server.fetches == 2

    # Made-up key ids cannot make every request a fetch.
    time.sleep(0.35)
    for n in range(20):
        made_up = jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256", headers={"kid": f"kid-{n}"})
        with pytest.raises(InvalidToken):
            check.verify(made_up)
    assert server.fetches == 3


def test_an_endpoint_that_hangs_or_is_down_is_a_refusal(server: JwksServer) -> None:
    signer = issuer()
    server.keys = signer.jwks()["keys"]
    server.delay = 2.0
    check = verifier(JwksKeys(server.url, timeout=0.3, retry_interval=60))
    started = time.monotonic()
    with pytest.raises(InvalidToken, match="cannot fetch"):
        check.verify(token(signer))
    assert time.monotonic() - started < 1.5
    with pytest.raises(InvalidToken, match="cannot fetch"):  # not tried again at once
        check.verify(token(signer, 1))
    assert server.fetches == 1

    down = verifier(JwksKeys("http://127.0.0.1:9/jwks.json", timeout=1, retry_interval=0))
    with pytest.raises(InvalidToken, match="cannot fetch"):
        down.verify(token(signer))


def test_a_token_without_a_key_id_is_refused_without_a_fetch(server: JwksServer) -> None:
    keys = JwksKeys(server.url)
    with pytest.raises(InvalidToken, match="kid"):
        keys(jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256"))
    with pytest.raises(InvalidToken):
        keys("not a token")
    assert server.fetches == 0
