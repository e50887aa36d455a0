"""Job creation in two steps: the catalog resolver's draft, and ``submit`` of a
draft that did not come from the catalog."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import ContainerSpec, HardwareSpec, OutputKind, QueueJob
from labcloud.db import unit_of_work
from labcloud.storage.base import Storage
from tests.user_api.jobs.conftest import OWNER
from user_api.auth.service import AuthenticatedUser
from user_api.catalog.schemas import Catalog
from user_api.jobs.drafts import DuplicateJobName, Image, JobDraft, JobRecord, submit
from user_api.jobs.resolvers.catalog import resolve_from_catalog
from user_api.jobs.schemas import JobCreate
from user_api.limits import ActiveJobLimitReached, UsageLimits
from user_api.models import Job, User, WorkerOutbox


def _caller(
    sessions: sessionmaker[Session], limits: UsageLimits = UsageLimits()
) -> AuthenticatedUser:
    with sessions() as session:
        user = session.scalars(select(User).where(User.email == OWNER)).one()
        return AuthenticatedUser(
            id=user.id,
            subject=user.subject,
            email=user.email,
            groups=frozenset(user.groups),
            limits=limits,
        )


def _upload(client: TestClient, headers: dict[str, str], folder: str, name: str) -> None:
    response = client.post(
        f"/files/{folder}/upload", files={"file": (name, b"content")}, headers=headers
    )
    assert response.status_code == 201, response.text


def test_the_catalog_resolver_expands_a_request_into_a_draft(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    _upload(client, owner, "data/set", "a.txt")
    _upload(client, owner, "config", "params.yaml")
    subject = _caller(sessions).subject
    payload = JobCreate.model_validate(
        {
            "job_name": "resolved",
            "priority": 2,
            "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
            "attributes": {
                "files_down": {"data_ids": ["set"], "config_id": "params.yaml"},
                "env_vars": {"WORDCOUNT_PATTERN": "*.txt"},
            },
            "hardware": {"memory": 128},
        }
    )
    catalog: Catalog = client.app.state.catalog_store.current  # type: ignore[attr-defined]
    storage: Storage = client.app.state.storage  # type: ignore[attr-defined]
    draft = resolve_from_catalog(payload, subject=subject, catalog=catalog, storage=storage)
    entrypoint = catalog.get_entrypoint("demo", "latest", "wordcount")

    assert draft.job_name == "resolved" and draft.priority == 2
    assert draft.image == Image(
        url=entrypoint.handler.image_url,
        name=entrypoint.handler.image_name,
        version=entrypoint.handler.image_version,
    )
    assert list(draft.command) == entrypoint.app.cmd and draft.entrypoint == "wordcount"
    assert draft.env == {"WORDCOUNT_PATTERN": "*.txt"}
    assert draft.inputs == {
        "data/a.txt": f"{subject}/data/set/a.txt",
        "config/params.yaml": f"{subject}/config/params.yaml",
    }
    # The catalog's needs, raised by the request.
    assert draft.hardware.memory == 128 and draft.hardware.cpu_cores == 1
    assert draft.timeout == entrypoint.timeout
    assert draft.record.hardware == {
        "cpu_cores": None,
        "memory": 128,
        "gpu_model": None,
        "gpu_archi": None,
        "gpu_mem": None,
        "gpus": None,
    }
    assert draft.record.application == {
        "application": "demo",
        "version": "latest",
        "entrypoint": "wordcount",
    }
    # Resolving wrote nothing.
    with sessions() as session:
        assert session.scalars(select(Job)).all() == []


def _draft(subject: str, name: str = "inline") -> JobDraft:
    """A job no catalog entry describes, as another resolver would make it."""
    return JobDraft(
        job_name=name,
        image=Image(url="registry.example.org/tools/align:2"),
        command=["align", "--in", "/files/in/reads.fq"],
        inputs={"in/reads.fq": f"{subject}/data/reads.fq"},
        outputs={OutputKind.OUTPUT: "out", OutputKind.LOG: "log"},
        env={"THREADS": "4"},
        hardware=HardwareSpec(cpu_cores=4, memory=2048),
        timeout=3600,
        container=ContainerSpec(read_only_root=True),
        record=JobRecord(
            application={"application": "inline", "version": "1", "entrypoint": "align"},
            attributes={},
            hardware={},
            entrypoint_snapshot={},
        ),
    )


def test_submit_stores_and_enqueues_any_draft(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    caller = _caller(sessions)
    with unit_of_work(sessions) as session:
        job = submit(session, caller, _draft(caller.subject))
    listed = client.get(f"/jobs/{job.id}", headers=owner).json()
    assert listed["status"] == "queued" and listed["job_name"] == "inline"
    assert listed["application"]["application"] == "inline"
    assert listed["paths_out"] == {
        "output": "output/inline",
        "log": "log/inline",
        "artifact": "artifact/inline",
    }
    with sessions() as session:
        [message] = session.scalars(select(WorkerOutbox)).all()
        assert session.scalars(select(User.active_jobs).where(User.id == caller.id)).one() == 1
    assert message.kind == "enqueue" and message.job_id == job.id
    queued = QueueJob.model_validate(message.payload)
    spec = queued.job
    assert spec.handler.image_url == "registry.example.org/tools/align:2"
    assert spec.app.cmd == ["align", "--in", "/files/in/reads.fq"]
    assert spec.app.env == {"THREADS": "4"}
    assert spec.handler.files_down == {"in/reads.fq": f"{caller.subject}/data/reads.fq"}
    assert spec.handler.files_up == {OutputKind.OUTPUT: "out", OutputKind.LOG: "log"}
    assert (spec.hardware.cpu_cores, spec.timeout, spec.container.read_only_root) == (
        4,
        3600,
        True,
    )
    assert spec.meta.job_id == job.id
    assert queued.paths_upload.output == f"{caller.subject}/output/inline"


def test_submit_refuses_a_taken_name_and_a_full_account(
    client: TestClient, owner: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    caller = _caller(sessions)
    with unit_of_work(sessions) as session:
        submit(session, caller, _draft(caller.subject))
    with pytest.raises(DuplicateJobName), unit_of_work(sessions) as session:
        submit(session, caller, _draft(caller.subject))
    full = _caller(sessions, UsageLimits(max_active_jobs=1))
    with pytest.raises(ActiveJobLimitReached), unit_of_work(sessions) as session:
        submit(session, full, _draft(caller.subject, "second"))
    with sessions() as session:
        assert len(session.scalars(select(Job)).all()) == 1
        assert len(session.scalars(select(WorkerOutbox)).all()) == 1
