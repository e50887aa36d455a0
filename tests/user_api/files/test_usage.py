"""Storage usage counted in the user API's database (``user_api.files.usage``): the
count follows uploads, replacements, moves and deletions made through the files
service; two uploads cannot both take the last bytes; bytes written outside the
API (presigned uploads, jobs' results) are recounted from storage; upload URLs
carry the remaining quota. Real local storage and S3 on moto, databases on SQLite
and PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import delete, inspect, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import JobStatus, SignedRequest
from labcloud.db import (
    build_database_url,
    create_db_engine,
    make_session_factory,
    migrate,
    unit_of_work,
    utcnow,
)
from labcloud.storage.base import Entry, Storage
from labcloud.storage.local import LocalStorage
from labcloud.storage.quota import StorageLimitReached, bytes_stored
from labcloud.storage.s3 import S3Storage, s3_client
from labcloud.storage.signing import Audience, UrlSigner
from labcloud.storage.transfers import LocalTransfers
from tests.aws import MotoServer
from user_api.app import MIGRATIONS
from user_api.files import service
from user_api.files.usage import JOB_RESULTS_SETTLE, StorageUsageLedger
from user_api.jobs.lifecycle import Cause, transition
from user_api.models import STORAGE_USAGE, Job, User

SUBJECT = "u1"
BUCKET = "labcloud-usage"


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(build_database_url(database_url))
    migrate(engine, MIGRATIONS)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    signer = UrlSigner(b"k" * 32)
    transfers = LocalTransfers(signer, base_url="http://127.0.0.1:8000", audience=Audience.USER_API)
    (tmp_path / "data").mkdir()
    return LocalStorage(tmp_path / "data", transfers=transfers)


def ledger(
    sessions: sessionmaker[Session], storage: Storage, **options: float
) -> StorageUsageLedger:
    settings = {"max_age_seconds": 3600.0, "settle_seconds": 0.0, "stuck_seconds": 3600.0}
    return StorageUsageLedger(sessions, storage, **{**settings, **options})


def no_jobs(subject: str, name: str) -> bool:
    return False


def upload(
    storage: Storage,
    usage: StorageUsageLedger,
    name: str,
    data: bytes | BinaryIO,
    limit: int | None = None,
) -> None:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    service.upload_file(
        storage,
        SUBJECT,
        "data",
        "set",
        filename=name,
        stream=stream,
        job_named=no_jobs,
        max_bytes=limit,
        usage=usage,
    )


def counted(sessions: sessionmaker[Session], subject: str = SUBJECT) -> int | None:
    """The count as stored, without recounting."""
    with unit_of_work(sessions) as session:
        return session.scalar(
            select(STORAGE_USAGE.c.used_bytes).where(STORAGE_USAGE.c.subject == subject)
        )


def test_the_count_follows_uploads_replacements_moves_and_deletions(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    usage = ledger(sessions, storage)
    storage.write(f"{SUBJECT}/data/old/before.bin", io.BytesIO(b"b" * 7))
    # The first check counts what is already stored (the account's folder only).
    storage.write("u2/data/other.bin", io.BytesIO(b"o" * 1000))
    assert usage.used(SUBJECT) == 7
    upload(storage, usage, "a.bin", b"a" * 100)
    assert counted(sessions) == 107
    upload(storage, usage, "a.bin", b"a" * 40)  # replaced: the old size no longer counts
    assert counted(sessions) == 47
    service.rename(
        storage, SUBJECT, "data/set/a.bin", "config/a.bin", job_named=no_jobs
    )  # a move within the account changes nothing
    assert counted(sessions) == 47
    service.delete(storage, SUBJECT, "config/a.bin", usage=usage)
    assert counted(sessions) == 7
    upload(storage, usage, "b.bin", b"b" * 30)
    service.delete(storage, SUBJECT, "data/old", usage=usage)  # a folder: all it held
    assert counted(sessions) == 30
    # Every count matches what storage holds, and none listed storage to get there.
    assert bytes_stored(storage, SUBJECT) == 30
    assert usage.used(SUBJECT) == 30


class _Unsized(io.RawIOBase):
    """A stream that cannot tell its size before it is read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_uploads_over_the_limit_are_refused_and_counted_right(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    usage = ledger(sessions, storage)
    upload(storage, usage, "a.bin", b"a" * 60, limit=100)
    upload(storage, usage, "b.bin", b"b" * 40, limit=100)  # exactly at the limit
    with pytest.raises(StorageLimitReached, match="you store 100 bytes of your limit of 100"):
        upload(storage, usage, "c.bin", b"c", limit=100)
    upload(storage, usage, "b.bin", b"B" * 40, limit=100)  # a replacement of the same size
    assert counted(sessions) == 100
    # A stream of unknown size is let in while there is room, and removed when it
    # turned out not to fit; the count is what stays.
    service.delete(storage, SUBJECT, "data/set/b.bin", usage=usage)
    with pytest.raises(StorageLimitReached, match="the upload was not kept"):
        upload(storage, usage, "d.bin", io.BufferedReader(_Unsized(b"d" * 41)), limit=100)
    assert storage.stat(f"{SUBJECT}/data/set/d.bin") is None
    assert counted(sessions) == 60
    upload(storage, usage, "d.bin", io.BufferedReader(_Unsized(b"d" * 40)), limit=100)
    assert counted(sessions) == 100 == bytes_stored(storage, SUBJECT)


class _SlowStorage(LocalStorage):
    """Local storage whose writes take a while, so that uploads overlap."""

    def write(self, key: str, stream: BinaryIO) -> Entry:
        time.sleep(0.3)
        return super().write(key, stream)


def test_two_concurrent_uploads_cannot_both_take_the_last_bytes(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    (tmp_path / "slow").mkdir()
    storage = _SlowStorage(tmp_path / "slow")
    usage = ledger(sessions, storage)
    usage.used(SUBJECT)  # the account's row exists
    start = threading.Barrier(4)

    def attempt(index: int) -> bool:
        start.wait()
        try:
            upload(storage, usage, f"{index}.bin", b"x" * 60, limit=100)
        except StorageLimitReached:
            return False
        return True

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, range(4)))
    assert results.count(True) == 1, results
    assert counted(sessions) == 60 == bytes_stored(storage, SUBJECT)


def test_a_recount_does_not_overwrite_a_change_made_while_it_walked(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    class ChangingStorage(LocalStorage):
        """An upload through the ledger lands while the recount walks the folder."""

        usage: StorageUsageLedger | None = None

        def iter_files(self, key: str) -> Iterator[Entry]:
            found = list(super().iter_files(key))
            if self.usage is not None:
                usage, self.usage = self.usage, None
                upload(self, usage, "during.bin", b"d" * 10)
            yield from found

    (tmp_path / "changing").mkdir()
    storage = ChangingStorage(tmp_path / "changing")
    storage.write(f"{SUBJECT}/data/a.bin", io.BytesIO(b"a" * 5))
    usage = ledger(sessions, storage)
    assert usage.used(SUBJECT) == 5
    storage.usage = usage
    # The recount saw 5 bytes, but the count changed meanwhile (5 + 10): it stands.
    assert usage.recount(SUBJECT) >= 5
    assert counted(sessions) == 15
    assert usage.recount(SUBJECT) == 15 == counted(sessions)


def test_an_old_count_is_taken_again_from_storage(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    usage = ledger(sessions, storage, max_age_seconds=0.5)
    upload(storage, usage, "a.bin", b"a" * 10)
    storage.write(f"{SUBJECT}/data/outside.bin", io.BytesIO(b"o" * 5))  # not through the API
    assert usage.used(SUBJECT) == 10  # a fresh count is trusted
    time.sleep(0.6)
    assert usage.used(SUBJECT) == 15


def _policy(request: SignedRequest) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(base64.b64decode(request.data["policy"]))
    return document


def test_a_presigned_post_carries_the_remaining_quota_and_its_upload_is_counted(
    sessions: sessionmaker[Session], aws: MotoServer
) -> None:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    storage = S3Storage(s3_client(), BUCKET, prefix="labcloud/data")
    usage = ledger(sessions, storage)
    upload(storage, usage, "a.bin", b"a" * 300, limit=1000)

    def url(limit: int | None = 1000) -> SignedRequest:
        return service.upload_url(
            storage,
            SUBJECT,
            "data",
            "in",
            expires_in=600,
            max_bytes=limit,
            job_named=no_jobs,
            usage=usage,
        )

    request = url()
    assert ["content-length-range", 0, 700] in _policy(request)["conditions"]
    # The upload goes straight to S3, past the API: the count is taken from
    # storage while the URL may still be used.
    sent = httpx.post(
        request.url, data=request.data, files={"file": ("b.bin", b"b" * 650)}, timeout=30
    )
    assert sent.status_code == 204, sent.text
    assert usage.used(SUBJECT) == 950
    assert ["content-length-range", 0, 50] in _policy(url())["conditions"]
    # An upload through the API now sees the presigned one.
    with pytest.raises(StorageLimitReached, match="you store 950 bytes"):
        upload(storage, usage, "c.bin", b"c" * 51, limit=1000)
    upload(storage, usage, "c.bin", b"c" * 50, limit=1000)
    # At the limit no URL is handed out at all.
    with pytest.raises(StorageLimitReached, match="you store 1,000 bytes of your limit"):
        url()
    # Without a limit the policy caps nothing.
    uncapped = _policy(url(None))["conditions"]
    assert not [c for c in uncapped if isinstance(c, list) and c[0] == "content-length-range"]


def test_a_local_upload_url_allows_the_remaining_quota_only(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    usage = ledger(sessions, storage)
    upload(storage, usage, "a.bin", b"a" * 70, limit=100)
    request = service.upload_url(
        storage,
        SUBJECT,
        "data",
        "in",
        expires_in=600,
        max_bytes=100,
        job_named=no_jobs,
        usage=usage,
    )
    assert storage.transfers.upload(request.url.rsplit("/", 1)[1]).max_bytes == 30


def _job(sessions: sessionmaker[Session], subject: str) -> int:
    """An account with one running job, written as the user API writes them."""
    with unit_of_work(sessions) as session:
        user = User(subject=subject, email=f"{subject}@example.org", groups=["users"])
        user.active_jobs = 1
        session.add(user)
        session.flush()
        job = Job(
            user_id=user.id,
            job_name="job-1",
            priority=0,
            application={},
            attributes={},
            hardware={},
            entrypoint_snapshot={},
            paths_out={},
            status=JobStatus.RUNNING.value,
            date_created=utcnow(),
        )
        session.add(job)
        session.flush()
        return job.id


def test_after_a_job_ends_its_results_are_counted(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    job_id = _job(sessions, SUBJECT)
    usage = ledger(sessions, storage)
    upload(storage, usage, "a.bin", b"a" * 10)
    # Workers write the results through the worker API, straight to storage.
    storage.write(f"{SUBJECT}/output/job-1/result.csv", io.BytesIO(b"r" * 500))
    storage.write(f"{SUBJECT}/log/job-1/log.txt", io.BytesIO(b"l" * 20))
    assert usage.used(SUBJECT) == 10
    with unit_of_work(sessions) as session:
        moved = transition(session, job_id, JobStatus.FINISHED, cause=Cause.WORKER)
    assert moved is not None
    # The transition only marked the count (no listing inside the status update);
    # the next check recounts, and keeps doing so while late logs may still land.
    assert counted(sessions) == 10
    assert usage.used(SUBJECT) == 530
    storage.write(f"{SUBJECT}/log/job-1/late.txt", io.BytesIO(b"l" * 3))
    assert usage.used(SUBJECT) == 533
    with unit_of_work(sessions) as session:
        until = session.scalar(select(STORAGE_USAGE.c.unsettled_until))
    assert until is not None
    assert until - utcnow() <= JOB_RESULTS_SETTLE


def test_the_storage_usage_migration_upgrades_and_downgrades(database_url: str) -> None:
    engine = create_db_engine(build_database_url(database_url))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0005")
        migrate(engine, MIGRATIONS)
        now = utcnow()
        with engine.begin() as connection:
            connection.execute(
                STORAGE_USAGE.insert().values(
                    subject="s1", counted_at=now, changed_at=now, unsettled_until=None
                )
            )
            row = connection.execute(
                text("SELECT used_bytes, in_flight, version FROM storage_usage")
            ).one()
        assert tuple(row) == (0, 0, 0)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0005")
        with engine.connect() as connection:
            assert "storage_usage" not in inspect(connection).get_table_names()
    finally:
        engine.dispose()


def test_a_handed_out_url_keeps_the_count_recounted_until_it_has_expired(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    usage = ledger(sessions, storage, settle_seconds=1.0)
    upload(storage, usage, "a.bin", b"a" * 10)
    usage.expect_outside_writes(SUBJECT, expires_in=0)
    with unit_of_work(sessions) as session:
        until = session.scalar(select(STORAGE_USAGE.c.unsettled_until))
    assert until is not None and timedelta(0) < until - utcnow() <= timedelta(seconds=1)
    storage.write(f"{SUBJECT}/data/outside.bin", io.BytesIO(b"o" * 5))
    assert usage.used(SUBJECT) == 15  # recounted: still unsettled
    time.sleep(1.1)
    assert usage.used(SUBJECT) == 15  # the recount after the window settles it
    with unit_of_work(sessions) as session:
        assert session.scalar(select(STORAGE_USAGE.c.unsettled_until)) is None


def test_deleting_a_job_that_had_ended_recounts_without_its_results(
    sessions: sessionmaker[Session], storage: LocalStorage
) -> None:
    job_id = _job(sessions, SUBJECT)
    usage = ledger(sessions, storage)
    storage.write(f"{SUBJECT}/output/job-1/result.csv", io.BytesIO(b"r" * 500))
    with unit_of_work(sessions) as session:
        assert transition(session, job_id, JobStatus.FINISHED, cause=Cause.WORKER) is not None
    assert usage.used(SUBJECT) == 500
    time.sleep(0.01)
    with unit_of_work(sessions) as session:
        session.execute(update(STORAGE_USAGE).values(unsettled_until=None))  # long settled
    # Deleted as ``jobs.service.delete_job`` does: the (refused) cancel, then the
    # job's row and its result folders, in one transaction.
    with unit_of_work(sessions) as session:
        assert transition(session, job_id, JobStatus.CANCELED, cause=Cause.DELETE) is None
        session.execute(delete(Job).where(Job.id == job_id))
        storage.delete(f"{SUBJECT}/output/job-1")
    assert usage.used(SUBJECT) == 0
