"""The user API's admin routes (group ``admins``), one method per route."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from labcloud.contract import AccountStatus, Group, JobStatus
from labcloud_cli.api import ApiClient

# The answers as the routes send them (decoded JSON): the CLI shows them and passes
# them on with ``--json`` without a model of its own to keep in step with the server's.
Json = dict[str, Any]


class AdminClient(ApiClient):
    """The admin routes, as one admin (``login`` first)."""

    def users(
        self, *, search: str | None, status: AccountStatus | None, offset: int, limit: int
    ) -> list[Json]:
        params = {"search": search, "status": status, "offset": offset, "limit": limit}
        users: list[Json] = self.call("GET", "/admin/users", params=params)
        return users

    def account_action(self, email: str, action: str) -> Json:
        """``approve``, ``disable`` or ``enable`` an account; the account after it."""
        user: Json = self.call("POST", _user_path(email, action))
        return user

    def set_groups(self, email: str, groups: list[Group]) -> Json:
        user: Json = self.call("PUT", _user_path(email, "groups"), json_body={"groups": groups})
        return user

    def set_limits(self, email: str, limits: Json) -> Json:
        """``limits`` holds the fields to change; a field set to None returns to the
        default, one left out stays as it is."""
        user: Json = self.call("PUT", _user_path(email, "limits"), json_body=limits)
        return user

    def create_worker(self, name: str, *, cloud: bool) -> Json:
        created: Json = self.call(
            "POST", "/admin/workers", json_body={"name": name, "cloud": cloud}
        )
        return created

    def workers(self) -> list[Json]:
        """The connected workers (``GET /admin/workers``)."""
        workers: list[Json] = self.call("GET", "/admin/workers")
        return workers

    def queue(self) -> Json:
        overview: Json = self.call("GET", "/admin/queue")
        return overview

    def jobs(
        self, *, status: JobStatus | None, user: str | None, offset: int, limit: int
    ) -> list[Json]:
        params = {"status": status, "user": user, "offset": offset, "limit": limit}
        jobs: list[Json] = self.call("GET", "/admin/jobs", params=params)
        return jobs

    def cancel_job(self, job_id: int) -> Json:
        job: Json = self.call("POST", f"/admin/jobs/{job_id}/cancel")
        return job

    def catalog(self) -> Json:
        status: Json = self.call("GET", "/admin/catalog")
        return status

    def audit(self, *, offset: int, limit: int) -> list[Json]:
        entries: list[Json] = self.call(
            "GET", "/admin/audit", params={"offset": offset, "limit": limit}
        )
        return entries


def _user_path(email: str, action: str) -> str:
    return f"/admin/users/{quote(email, safe='@')}/{action}"
