"""The small error tree: each class is a decision the code branches on.

The class docstring is the default message, so each subclass stays two lines.
"""

from __future__ import annotations


class SyncdError(Exception):
    """syncd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(SyncdError):
    """A setting is missing or malformed; nothing was done (exit code 2)."""


class UsageError(SyncdError):
    """The command was given something it cannot use (exit code 2)."""


class DatabaseUnavailable(SyncdError):
    """The database does not answer; nothing was done: try again later (exit code 1)."""


class MigrationError(SyncdError):
    """The database schema cannot be brought up to date."""


class CriteoError(SyncdError):
    """Criteo did not accept a request."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        self.body = body


class RetryableError(CriteoError):
    """A timeout, a dropped connection, a 429 or a 5xx: the same request may succeed later."""


class PermanentError(CriteoError):
    """Criteo refused the request itself (a 4xx): sending it again will not help."""


class PayloadTooLarge(PermanentError):
    """Criteo refused the request as too large: the chunk should be halved."""


class RunAbortingError(PermanentError):
    """A refusal that every other request would meet too (bad credentials, retired API version)."""
