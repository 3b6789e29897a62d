"""The journal's kept position: durable (fsync, atomic replace, folder fsync'ed), one file per
journal, one writer at a time, never a guessed position."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from bridge.checkpoint import Checkpoint, StateUnavailable

URL = "https://events-va6.adobe.io/events/organizations/1/integrations/2/reg"


def test_a_saved_position_is_loaded_by_the_next_run(tmp_path: Path) -> None:
    first = Checkpoint(tmp_path / "state", URL)
    first.open()
    assert first.load() is None
    first.save("camel:a:b")
    first.save("camel:a:c")
    first.close()
    again = Checkpoint(tmp_path / "state", URL)
    again.open()
    assert again.load() == "camel:a:c"
    doc = orjson.loads(again.file.read_bytes())
    assert (doc["journal"], doc["position"], doc["version"]) == (URL, "camel:a:c", 1)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".lock", again.file.name]


def test_the_write_is_fsynced_then_renamed_then_the_folder_fsynced(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    state = Checkpoint(tmp_path, URL)
    state.open()
    state.save("p1")
    assert fsyncs == [str(state.file.with_suffix(".tmp")), str(tmp_path)]
    assert not state.file.with_suffix(".tmp").exists()


def test_another_journal_has_a_file_of_its_own(tmp_path: Path) -> None:
    one = Checkpoint(tmp_path, URL)
    one.save("p1")
    other = Checkpoint(tmp_path, URL + "-other")
    assert other.file != one.file
    assert other.load() is None


def test_two_writers_cannot_hold_one_folder(tmp_path: Path) -> None:
    held = Checkpoint(tmp_path, URL)
    held.open()
    second = Checkpoint(tmp_path, URL)
    with pytest.raises(StateUnavailable, match="in use by another process"):
        second.open()
    held.close()
    second.open()  # released with the first one's descriptor
    second.close()


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"position": ""}', b'{"position": 5}'])
def test_a_damaged_file_is_reported_never_guessed(tmp_path: Path, content: bytes) -> None:
    state = Checkpoint(tmp_path, URL)
    state.file.write_bytes(content)
    with pytest.raises(StateUnavailable, match="holds no position"):
        state.load()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_folder_it_cannot_write_is_reported(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StateUnavailable, match="journal state folder"):
            Checkpoint(tmp_path / "state", URL).open()
    finally:
        tmp_path.chmod(0o700)
