"""The outbox on disk: the folder's lock, durable folder entries, a folder lost under us."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.message import Outbound
from bridge.segments import OutboxLocked, SegmentLog, decode, encode
from bridge.spool import QuarantineFile, read_quarantine


def message(n: int) -> Outbound:
    return Outbound(
        "ex", f"k.{n}", b'{"n":%d}' % n, f"m{n}", "t", datetime(2026, 1, 2, tzinfo=UTC), {}
    )


def test_a_new_segment_and_the_cursor_are_durable_in_their_folder(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    folder = tmp_path / "deep" / "outbox"
    log = SegmentLog(folder)
    log.lock()
    assert str(folder.parent) in fsyncs  # the folder's own entry, in its parent
    log.recover()  # opens segment 1
    assert fsyncs[-1] == str(folder)  # its entry, right after it was created
    fsyncs.clear()
    ((segment, end),) = log.write(encode(message(1)), [len(encode(message(1)))])
    assert fsyncs == [str(log.path(segment))]
    fsyncs.clear()
    log.open_segment(log.segment + 1)  # a rotation creates a file: the folder again
    assert fsyncs == [str(folder)]
    fsyncs.clear()
    log.write_cursor(segment, end)
    assert fsyncs == [str(folder / "cursor.tmp"), str(folder)]  # the file, then its rename
    log.close()


def test_the_folder_is_locked_by_one_process_only(tmp_path: Path) -> None:
    first = SegmentLog(tmp_path / "outbox")
    first.lock()
    script = (
        "import sys; from pathlib import Path; from bridge.segments import SegmentLog, "
        "OutboxLocked\ntry:\n    SegmentLog(Path(sys.argv[1])).lock()\nexcept OutboxLocked as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "outbox")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert other.returncode == 3
    assert f"in use by pid {os.getpid()}" in other.stdout
    first.close()  # released: the next one may take it
    second = SegmentLog(tmp_path / "outbox")
    second.lock()
    second.close()


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    first = SegmentLog(tmp_path)
    first.lock()
    with pytest.raises(OutboxLocked):
        SegmentLog(tmp_path).lock()  # flock is per open file: workers of one parent included
    first.close()


@pytest.mark.parametrize("how", ["folder deleted", "folder replaced", "segment deleted"])
def test_a_lost_folder_is_noticed_and_written_again(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "outbox"
    log = SegmentLog(folder)
    log.lock()
    log.recover()
    frames = [encode(message(n)) for n in range(5)]
    log.write(b"".join(frames), [len(f) for f in frames])
    assert log.intact()
    if how == "segment deleted":
        log.path(log.segment).unlink()
    else:
        shutil.rmtree(folder)
        if how == "folder replaced":
            folder.mkdir()
    assert not log.intact()
    ends = log.rewrite(frames)  # what the outbox held, from memory
    assert log.intact()
    assert (folder / "lock").exists()
    segment, _ = ends[0]
    records, _ = decode(log.path(segment).read_bytes())
    assert [m for _, m in records] == [message(n) for n in range(5)]
    assert log.read_cursor() == (segment, 0)
    log.close()
    restarted = SegmentLog(folder)
    restarted.lock()
    assert [m for _, _, m, _ in restarted.recover()] == [message(n) for n in range(5)]
    restarted.close()


def test_the_quarantine_keeps_its_records_when_its_file_is_deleted(tmp_path: Path) -> None:
    quarantine = QuarantineFile(tmp_path)
    quarantine.add([encode(message(1), quarantine_reason="too big")])
    (tmp_path / "quarantine.log").unlink()
    quarantine.add([encode(message(2), quarantine_reason="too big too")])
    kept = read_quarantine(tmp_path)
    assert [m.message_id for m, _ in kept] == ["m1", "m2"]
    assert [meta["quarantine_reason"] for _, meta in kept] == ["too big", "too big too"]
    quarantine.close()
