"""Files written atomically: the previous file or the new one, never half of one."""

from __future__ import annotations

import pytest

from extract.atomic import atomic_write


def test_a_finished_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with atomic_write(path) as temporary:
        assert temporary.parent == path.parent and temporary != path
        temporary.write_text("new\n")
        assert path.read_text() == "old\n"  # not visible before the block ends
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_write_that_fails_half_way_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as temporary:
        temporary.write_bytes(b"half of the ne")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
