"""One family of errors for everything mcc raises on purpose.

Each class says whose fault it is: the client's (:class:`BadRequest`), the
operator's (:class:`ConfigError`), or upstream's (:class:`UpstreamError`).
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ConfigError",
    "McError",
    "NotCacheable",
    "RangeNotSatisfiable",
    "Refused",
    "UpstreamError",
    "VersionChanged",
]


class McError(Exception):
    """Base class of every error mcc raises on purpose."""


class BadRequest(McError):
    """The client sent something we will not serve.

    Args:
      message: one line saying what was wrong, naming the value received.
      status_hint: the HTTP status to answer with (400, 403, 405, 413, 431, 508...).
    """

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ConfigError(McError):
    """The configuration is invalid.

    Args:
      problems: one line per problem, each ``key: value reason``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UpstreamError(McError):
    """Upstream (the origin or a parent cache) failed to deliver what was asked.

    Args:
      message: what went wrong, naming the upstream.
      status_hint: the status a client should see (502, or 504 for timeouts).
    """

    def __init__(self, message: str, *, status_hint: int = 502) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class Refused(UpstreamError):
    """mcc refused to contact that upstream (it resolves to an internal address, or a
    redirect leads off the allowlist). ``status_hint`` is 403."""


class VersionChanged(UpstreamError):
    """The object changed upstream while it was being read; no bytes were mixed."""


class RangeNotSatisfiable(McError):
    """The requested byte range lies outside the object.

    Args:
      size: the object's full length, for ``Content-Range: bytes */size``.
    """

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for an object of {size} bytes")
        self.size = size


class NotCacheable(McError):
    """Upstream's answer must not be stored or shared (no-store, private, a non-200 status).

    The caller should forward the client's own request upstream unstored.
    """
