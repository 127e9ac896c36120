"""What the API server says when it refuses: one class per status, so a
caller names the refusal it expects (`except errors.NotFound`) instead of
comparing numbers.

Every refusal carries a `Status` object (its `reason` and `message`); a
watch sends one as an ERROR event inside an HTTP 200, so the code then comes
from the Status itself. Both go through `from_status`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """A Kubernetes API answer other than success, with its Status."""

    # The HTTP status a class stands for; None for the base class, which
    # also carries the statuses no class is made for (400, 405, 415, ...).
    status: ClassVar[int | None] = None

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class Unauthorized(ApiError):
    """401: no credentials, or ones the server does not accept."""

    status = 401


class Forbidden(ApiError):
    """403: authenticated, but RBAC does not allow the verb."""

    status = 403


class NotFound(ApiError):
    """404: no such object, or no such resource (a CRD not installed)."""

    status = 404


class Conflict(ApiError):
    """409: the object already exists (reason AlreadyExists), or was written
    since the resourceVersion the write carried (reason Conflict)."""

    status = 409


class Gone(ApiError):
    """410: the resourceVersion or continue token asked for is older than
    the server keeps (reason Expired)."""

    status = 410


class Invalid(ApiError):
    """422: the object fails validation; the Status's details name the fields."""

    status = 422


class TooManyRequests(ApiError):
    """429: throttled by API Priority and Fairness; try again later."""

    status = 429


class ServerError(ApiError):
    """5xx: the server failed (500), is unavailable (503) or timed out (504)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls
    for cls in (Unauthorized, Forbidden, NotFound, Conflict, Gone, Invalid, TooManyRequests)
    if cls.status is not None
}


def from_status(status: Any, *, code: int | None = None, reason: str = "") -> ApiError:
    """The error a failure `Status` stands for. `code` and `reason` are the
    HTTP response's, when there is one: its code decides, and its reason
    phrase stands in for a Status without one. Without a code (a watch's
    ERROR event), the Status's own code decides; a body that is no Status
    counts as a 500."""
    body: dict[str, Any] = status if isinstance(status, dict) else {}
    if code is None:
        given = body.get("code")
        code = given if isinstance(given, int) else 500
    cls = _BY_STATUS.get(code) or (ServerError if code >= 500 else ApiError)
    return cls(code, str(body.get("reason") or reason), str(body.get("message") or ""))
