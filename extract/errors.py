"""Expected problems (bad input, missing files) and how every command reports them.

An expected problem is a `UserError`: the command prints one line naming the file and what is
wrong, and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback.

A message that names an option holds it as an `Option`, not as text: each front end renders it
in its caller's words, the command as its flag (``--overwrite``, ``--batch-size 0``) through
`UserError.for_command`, the Python API as its keyword (``overwrite=True``, ``batch_size=0``)
through ``str(error)``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

USAGE_EXIT = 2


NO_VALUE: Any = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """An option named in an error message, by its Python name (``batch_size``) and, where the
    message quotes one, the value given (True for a switch such as ``overwrite``)."""

    name: str
    value: Any = NO_VALUE

    def flag(self) -> str:
        """The command's words: ``--batch-size``, ``--batch-size 0``, ``--overwrite``."""
        flag = "--" + self.name.replace("_", "-")
        return flag if self.value is NO_VALUE or self.value is True else f"{flag} {self.value}"

    def keyword(self) -> str:
        """The Python API's words: ``batch_size``, ``batch_size=0``, ``overwrite=True``."""
        return self.name if self.value is NO_VALUE else f"{self.name}={self.value!r}"


class UserError(Exception):
    """A problem with the user's input that they can fix; its message is shown as is.

    The message is given in parts: text, and the `Option`s it names, rendered by the front end
    that reports it (``str(error)`` in keywords, `for_command` in flags).
    """

    def __init__(self, *parts: str | Option):
        super().__init__(*parts)
        self.parts = parts

    def render(self, words: Callable[[Option], str]) -> str:
        return "".join(part if isinstance(part, str) else words(part) for part in self.parts)

    def __str__(self) -> str:
        return self.render(Option.keyword)

    def for_command(self) -> str:
        return self.render(Option.flag)


class WriteFailed(UserError):
    """Writing an HDF5 file failed (disk full, quota). HDF5 cannot be shut down cleanly after
    that, so the command reports it and leaves at once; rows flushed before are kept."""


def contradiction() -> UserError:
    """resume and overwrite given together, in extract and in head alike."""
    return UserError(
        Option("resume", True),
        " and ",
        Option("overwrite", True),
        " contradict each other; pick one",
    )


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
        print(f"error: {error.for_command()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(USAGE_EXIT)
    except UserError as error:
        print(f"error: {error.for_command()}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
