"""Domain errors shared by every LabCloud service.

Each error carries the HTTP status it maps to and a default message (its docstring),
so services raise meaningful exceptions and each API maps them to a response in one
place (``labcloud.web.install_error_handlers``)::

    LabCloudError
     ├── BadRequest (400)        ├── MethodNotAllowed (405)
     ├── Unauthorized (401)      ├── Conflict (409)
     ├── Forbidden (403)         ├── PayloadTooLarge (413)
     ├── NotFound (404)          ├── TooManyRequests (429)
     └── Unavailable (503)
"""

from __future__ import annotations

from typing import ClassVar


class LabCloudError(Exception):
    """The request could not be served."""

    status_code: ClassVar[int] = 400

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        super().__init__(self.message)


class BadRequest(LabCloudError):
    """The request is invalid."""

    status_code = 400


class Unauthorized(LabCloudError):
    """Missing or invalid credentials."""

    status_code = 401


class Forbidden(LabCloudError):
    """The caller is not allowed to do this."""

    status_code = 403


class NotFound(LabCloudError):
    """Not found."""

    status_code = 404


class MethodNotAllowed(LabCloudError):
    """This operation is not allowed on this resource."""

    status_code = 405


class Conflict(LabCloudError):
    """The resource already exists or is in a conflicting state."""

    status_code = 409


class PayloadTooLarge(LabCloudError):
    """The request is too large."""

    status_code = 413


class TooManyRequests(LabCloudError):
    """A usage limit has been reached."""

    status_code = 429


class Unavailable(LabCloudError):
    """A service this request depends on is unavailable; try again later."""

    status_code = 503
