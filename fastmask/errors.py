"""Errors that the command line reports as one line (exit code 2) instead of a traceback.

A :class:`UsageError` is a mistake in what the user asked for (a flag, a config key, a file
or folder) rather than a fault in fastmask. Its message names the flag, key or file and says
what was expected. It is a ``ValueError``, so library callers can catch it as one.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A user error: the message names the flag, config key or file and what was expected."""
