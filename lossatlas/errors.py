"""Errors a user can fix. The CLI turns a ``UserError`` into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it (one line, no traceback)."""


class NonFiniteError(UserError):
    """A checkpoint or a computed quantity holds NaN or inf."""
