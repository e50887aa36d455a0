"""The worker runner: a long-running process on each worker host.

It leases jobs from the worker API, stages their inputs into a job folder, runs the
job's command in a container on an execution backend, uploads the results and
reports every status change (``worker_runner.loop.Runner``). Start it with
``python -m worker_runner --env-file worker.env``.

Errors raised by the runner's parts form one tree; each class's docstring is its
default message::

    RunnerError
     ├── WorkerApiError           (worker_runner.client) the worker API failed a call
     │    ├── AuthenticationFailed    the token endpoint refused the credentials
     │    └── JobGone                 404 on a job: it is no longer ours, abandon it
     ├── StagingError             (worker_runner.staging) inputs or outputs could not move
     │    └── UnsafePath              a path would escape the job folder
     ├── BackendError             (worker_runner.backends.base) the backend failed
     │    └── ImageUnavailable        the image is neither local nor pullable
     └── JobFailed                (worker_runner.loop) the job ends ``error`` with a reason
"""

from __future__ import annotations


class RunnerError(Exception):
    """The worker runner failed."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        super().__init__(self.message)
