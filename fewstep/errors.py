"""The one error type for user mistakes.

``fewstep`` answers a UsageError with one line and exit status 2 (a bad flag, a missing file, a config key that
does not exist, a corrupt checkpoint); anything else is a bug and keeps its traceback (exit 1). It subclasses
ValueError so library callers that already catch ValueError keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Something the user asked for or handed in is wrong; the message says what and how to fix it."""
