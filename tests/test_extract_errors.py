"""How expected problems are worded."""

from __future__ import annotations

from extract.errors import MESSAGE_LIMIT, first_line


def test_a_library_error_is_quoted_as_its_first_line_cut_to_the_limit():
    error = OSError("x" * (3 * MESSAGE_LIMIT) + "\nsecond line of a long library message")
    assert first_line(error) == "x" * MESSAGE_LIMIT
    assert first_line(RuntimeError("short\nmore")) == "short"
    assert first_line(KeyError()) == "KeyError"
