"""Expected stops: what a user did or has, not a bug in loraforge.

A bad param, a missing or unreadable input, too many rejected images, a training run that
diverged: these stop the run with one line naming the key or file (`loraforge: <message>` on
stderr, exit code 2) and no traceback. Anything else is a bug and keeps its traceback; set
`LORAFORGE_DEBUG=1` to get the traceback of an expected stop too.

Each class also derives from the built-in exception it refines, so `except ValueError` and
`pytest.raises(FileNotFoundError)` keep working.
"""

from __future__ import annotations


class StopRun(Exception):
    """An expected stop; its message says what to fix, naming the key or the file."""


class InputError(StopRun, ValueError):
    """A param, a setting in a file, or an input that cannot be used."""


class MissingInput(StopRun, FileNotFoundError):
    """A file or folder the run needs is not there."""


class Diverged(StopRun, FloatingPointError):
    """Training produced a NaN/inf loss or weights; nothing was saved for that epoch."""
