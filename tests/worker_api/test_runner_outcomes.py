"""How a run ended travels from the runner to the user API: the runner's final
report carries its ``Outcome`` as the body of ``PUT /jobs/{id}/status``, the
worker API sets the attempt it counted and its status relay forwards both. Real
worker API (uvicorn on loopback), the runner's in-package fake backend."""

from __future__ import annotations

from pathlib import Path

from labcloud.contract import FailureKind, Outcome, StatusUpdate
from tests.worker_api.conftest import FakeUserApi
from tests.worker_api.test_runner_uploads import _run, worker_api  # noqa: F401
from worker_runner.backends.fake import FakeProgram


def test_a_failed_run_reaches_the_user_api_with_its_outcome(
    worker_api: str,  # noqa: F811
    fake_user_api: FakeUserApi,
    tmp_path: Path,
) -> None:
    program = FakeProgram(exit_code=3, log_lines=("step 1", "boom"))
    final = StatusUpdate.model_validate(_run(worker_api, fake_user_api, tmp_path, program))
    assert final.status == "error"
    outcome = final.outcome
    assert isinstance(outcome, Outcome)
    assert (outcome.exit_code, outcome.failure, outcome.attempt) == (3, FailureKind.USER_ERROR, 1)
    assert outcome.log_tail is not None and "boom" in outcome.log_tail
    assert outcome.started_at is not None and outcome.ended_at is not None
    assert outcome.started_at <= outcome.ended_at


def test_a_finished_run_reaches_the_user_api_with_its_outcome(
    worker_api: str,  # noqa: F811
    fake_user_api: FakeUserApi,
    tmp_path: Path,
) -> None:
    program = FakeProgram(log_lines=("done",))
    final = StatusUpdate.model_validate(_run(worker_api, fake_user_api, tmp_path, program))
    assert final.status == "finished"
    assert final.outcome is not None
    assert (final.outcome.exit_code, final.outcome.failure, final.outcome.attempt) == (0, None, 1)
    # Every earlier status went without one.
    with fake_user_api.lock:
        earlier = [body for _code, body, _key in fake_user_api.received][:-1]
    assert earlier and all(body.get("outcome") is None for body in earlier)
