"""Which exceptions are the user's to fix, and how `main` shows them.

The package raises standard exception types with messages that name the problem and the fix;
their type says whose problem it is:

    ValueError          a bad config value or bad input (subclasses: checkpoints'
                        IncompatibleCheckpointError, convert's ConversionError, ...)
    OSError             a file or directory that is missing, unreadable or unwritable
                        (FileNotFoundError, PermissionError, FileExistsError, ...)
    FloatingPointError  a run that diverged (train.NonFiniteError)
    ImportError         a missing optional dependency (e.g. torch for .pt files; the message
                        says what to install)

`main` prints these as one line (`error: <message>`) and exits with status 1; any other type
(TypeError, KeyError, XLA's RuntimeError, ...) is a bug and keeps its traceback. Code that
catches a library's own exception type for a file it reads re-raises it as one of these,
naming the file and what it should be.
"""

from __future__ import annotations

import sys

EXPECTED: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, ImportError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with ' | ')."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def report(error: BaseException) -> None:
    """Prints an expected error for the user: one line `error: ...` on stderr."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
