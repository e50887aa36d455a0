"""Sending one email through Mailjet's v3.1 send API (``mailjet-rest``).

``send`` is blocking (``requests`` underneath): call it from a worker thread. It
never raises; it says what happened and whether trying again can help."""

from __future__ import annotations

import email.utils
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import requests
from mailjet_rest import Client
from mailjet_rest.utils.guardrails import SecureHTTPAdapter

logger = logging.getLogger(__name__)

SENDER_NAME = "LabCloud"
REQUEST_TIMEOUT_SECONDS = 30.0


class SendOutcome(StrEnum):
    SENT = "sent"
    # Worth another try later: rate limit, server error, network trouble.
    RETRY = "retry"
    # Trying again cannot help: bad credentials, a request Mailjet refuses.
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    job_id: int
    recipient: str
    subject: str
    html: str
    text: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """The result of one attempt to hand an email to Mailjet."""

    outcome: SendOutcome
    reason: str = ""
    # Seconds the server asked us to wait (``Retry-After``), when it said so.
    retry_after: float | None = None


class MailjetTransport:
    """A Mailjet API client bound to the sender address and credentials."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        secret_key: str,
        sender_address: str,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        # Raises ValueError for a base URL mailjet-rest refuses (it only talks to
        # mailjet.com hosts and loopback), so a wrong MAILJET_API_URL stops the start.
        self._client = Client(
            auth=(api_key, secret_key), version="v3.1", api_url=api_url, timeout=timeout
        )
        # mailjet-rest retries 429/5xx itself, sleeping in the calling thread (for as
        # long as a Retry-After asks); the outbox schedules retries instead.
        self._client.session.mount("https://", SecureHTTPAdapter(max_retries=0))
        self._sender = sender_address

    def close(self) -> None:
        self._client.close()

    def send(self, message: OutgoingEmail) -> SendResult:
        payload = {
            "Messages": [
                {
                    "From": {"Email": self._sender, "Name": SENDER_NAME},
                    "To": [{"Email": message.recipient}],
                    "Subject": message.subject,
                    "TextPart": message.text,
                    "HTMLPart": message.html,
                    "CustomID": f"labcloud-job-{message.job_id}",
                }
            ]
        }
        try:
            response = self._client.send.create(data=payload)
        except Exception as exc:  # mailjet-rest wraps every failure; classify them below
            return _classify_failure(exc)
        return SendResult(SendOutcome.SENT, f"Mailjet answered {response.status_code}")


def _classify_failure(exc: Exception) -> SendResult:
    response = _response_of(exc)
    if response is None:
        # No answer at all (connection refused, timeout, DNS): transient.
        return SendResult(SendOutcome.RETRY, f"{type(exc).__name__}: {exc}")
    status = response.status_code
    reason = f"Mailjet answered {status}: {_error_text(response)}"
    if status == 429 or status >= 500 or status == 408:
        return SendResult(SendOutcome.RETRY, reason, retry_after=parse_retry_after(response))
    return SendResult(SendOutcome.REJECTED, reason)


def _response_of(exc: BaseException) -> requests.Response | None:
    """The HTTP response behind a mailjet-rest exception (it keeps the ``requests``
    error as the cause), or None when the request never got one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.RequestException) and seen.response is not None:
            return seen.response
        seen = seen.__cause__ or seen.__context__
    return None


def _error_text(response: requests.Response) -> str:
    """Mailjet's own explanation when it gave one, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        if body.get("ErrorMessage"):
            return str(body["ErrorMessage"])[:500]
        messages = body.get("Messages")
        if isinstance(messages, list):
            errors = [
                str(error.get("ErrorMessage"))
                for message in messages
                if isinstance(message, dict)
                for error in message.get("Errors") or []
                if isinstance(error, dict)
            ]
            if errors:
                return "; ".join(errors)[:500]
    return response.text[:500]


def parse_retry_after(response: requests.Response) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
