"""A failed connection attempt: unavailable (try again) or configuration, never the password."""

from __future__ import annotations

import asyncpg
import pytest

from syncd.db import connect_error
from syncd.errors import ConfigError, DatabaseUnavailable

URL = "postgresql://syncd:pa55/w0rd@db.internal:5432/crm"


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 5432)"),
        TimeoutError(),
        OSError(-2, "Name or service not known"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    ],
)
def test_a_server_that_does_not_answer_is_unavailable(exc: BaseException) -> None:
    error = connect_error(exc, URL)
    assert isinstance(error, DatabaseUnavailable)
    assert "try again" in str(error) and "\n" not in str(error)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("invalid literal for int() with base 10: 'pa55'"),
        asyncpg.InvalidPasswordError('password authentication failed for user "pa55"'),
        asyncpg.InvalidCatalogNameError('database "w0rd" does not exist\nDETAIL: w0rd'),
        asyncpg.ClientConfigurationError("invalid IPv6 address: 'pa55'"),
    ],
)
def test_configuration_errors_never_show_the_password(exc: BaseException) -> None:
    error = connect_error(exc, URL)
    assert isinstance(error, ConfigError)
    message = str(error)
    assert message.startswith("SYNCD_DATABASE_URL: ") and "\n" not in message, message
    assert "pa55" not in message and "w0rd" not in message, message


def test_a_role_refused_by_the_server_points_at_the_privileges() -> None:
    exc = asyncpg.InsufficientPrivilegeError('permission denied for database "crm"')
    message = str(connect_error(exc, URL))
    assert 'permission denied for database "crm"' in message
    assert "Database privileges" in message
