"""The worker runner: a long-running process on each worker host.

It leases jobs from the worker API, stages their inputs into a job folder, runs the
job's command in a container on an execution backend, uploads the results and
reports every status change. Its parts: ``dispatcher`` (pull while the backend has
room, slots, shutdown, hand-back, leftovers), ``job`` (one job's phases),
``reporting`` (statuses, keep-alives, the final report with its outcome),
``outcomes`` (why a job failed), ``staging`` (the job folder), ``client`` (the
worker API) and ``backends`` (where jobs run, chosen by ``BACKEND``). Start it
with ``python -m worker_runner --env-file worker.env``.

Errors raised by the runner's parts form one tree; each class's docstring is its
default message::

    RunnerError
     ├── WorkerApiError           (worker_runner.client) the worker API failed a call
     │    ├── AuthenticationFailed    the token endpoint refused the credentials
     │    └── JobGone                 404 on a job: it is no longer ours, abandon it
     ├── StagingError             (worker_runner.staging) inputs or outputs could not move
     │    ├── UnsafePath              a path would escape the job folder
     │    └── ResultsRefused          the worker API refused to keep the results
     ├── BackendError             (worker_runner.backends.base) the backend failed
     │    └── ImageUnavailable        the image is neither local nor pullable
     └── JobFailed                (worker_runner.outcomes) the job ends ``error`` with a reason
"""

from __future__ import annotations


class RunnerError(Exception):
    """The worker runner failed."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        super().__init__(self.message)
