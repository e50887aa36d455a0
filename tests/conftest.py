"""Shared fixtures: real PostgreSQL databases, the Docker engine, signing keys.

A test that needs an absent component is skipped with the reason locally; under CI
(``CI=true``) a skipped test fails the run, so nothing is silently left out."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# moto's server for tests that use AWS (fixtures ``aws`` and ``moto_server``).
from tests.aws import aws, moto_server  # noqa: F401
from tests.databases import temporary_postgres_database

POSTGRES_ADMIN_URL = os.environ.get(
    "LABCLOUD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _docker_problem() -> str | None:
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker unavailable: {exc}"
    if result.returncode != 0:
        return "no Docker engine answers `docker info` (run scripts/ensure-deps.sh)"
    return None


def _postgres_problem() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any driver/connection error means "not available"
        return f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc.__class__.__name__}"
    return None


_problems: dict[str, str | None] = {}


def component_problem(name: str) -> str | None:
    if name not in _problems:
        _problems[name] = _docker_problem() if name == "docker" else _postgres_problem()
    return _problems[name]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in ("docker", "postgres"):
            if item.get_closest_marker(name) is not None:
                problem = component_problem(name)
                if problem:
                    item.add_marker(pytest.mark.skip(reason=problem))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if IN_CI and skipped and exitstatus == 0:
        if reporter is not None:
            reporter.write_line(
                f"CI: {skipped} test(s) were skipped; every component must be present in CI",
                red=True,
            )
        session.exitstatus = 1


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    problem = component_problem("postgres")
    if problem:
        pytest.skip(problem)
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with temporary_postgres_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def docker_available() -> None:
    problem = component_problem("docker")
    if problem:
        pytest.skip(problem)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a throwaway PostgreSQL database. Tests
    using it run on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_database")
    return url
