"""Expected problems (bad input, missing files) and how every command reports them.

An expected problem is a `UserError`: the command prints one line naming the file and what is
wrong, and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USAGE_EXIT = 2


class UserError(Exception):
    """A problem with the user's input that they can fix; its message is shown as is."""


class WriteFailed(UserError):
    """Writing an HDF5 file failed (disk full, quota). HDF5 cannot be shut down cleanly after
    that, so the command reports it and leaves at once; rows flushed before are kept."""


MESSAGE_LIMIT = 200


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line and `MESSAGE_LIMIT` characters (library
    errors can run to a page, and a message quoted in ours must keep it one readable line),
    or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:MESSAGE_LIMIT] if text else type(error).__name__


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's `main`, turning `UserError` into one line on stderr and exit status 2."""
    try:
        status = main(argv)
    except WriteFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(USAGE_EXIT)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
