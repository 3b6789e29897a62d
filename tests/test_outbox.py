"""The outbox's file format and bookkeeping: frames, torn tails, group commit, bounds, cursor."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp.commands import Basic

from bridge import metrics
from bridge.errors import BrokerUnavailable
from bridge.message import Outbound
from bridge.outbox import Outbox, OutboxFull, OutboxUnavailable
from bridge.publisher import PublishFailed
from bridge.segments import decode, encode
from bridge.spool import read_quarantine


def message(n: int, body: bytes = b'{"x":1}') -> Outbound:
    return Outbound(
        exchange="ex",
        routing_key=f"k.{n}",
        body=body,
        message_id=f"m{n}",
        type="code",
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        headers={"event-id": f"m{n}", "job-status": "failed"},
    )


class Recorder:
    """Stands in for the broker in bookkeeping tests only; the real replay is in test_publisher."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.published: list[Outbound] = []
        self.fail_next = 0

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise BrokerUnavailable("not_connected", "down")
        self.published.extend(messages)


@given(st.binary(max_size=2048), st.dictionaries(st.text(max_size=10), st.text(max_size=20)))
def test_frames_round_trip(body: bytes, headers: dict[str, str]) -> None:
    original = Outbound("ex", "rk", body, "id", "t", datetime.now(UTC), headers)
    data = encode(original) + encode(original)
    records, valid = decode(data)
    assert valid == len(data)
    assert [m for _, m in records] == [original, original]


@pytest.mark.parametrize("cut", [1, 5, 11, 13, 30])
def test_a_torn_frame_ends_the_valid_part(cut: int) -> None:
    first, second = encode(message(1)), encode(message(2))
    records, valid = decode(first + second[:-cut])
    assert [m.message_id for _, m in records] == ["m1"]
    assert valid == len(first)
    flipped = bytearray(first + second)
    flipped[len(first) + 20] ^= 0xFF  # a bit flipped inside the second payload: crc catches it
    assert len(decode(bytes(flipped))[0]) == 1


async def test_appends_survive_a_restart_and_a_torn_tail_is_truncated(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await outbox.open()
    await outbox.append([message(1), message(2)])
    await outbox.append([message(3)])
    await outbox.close()
    (segment,) = tmp_path.glob("segment-*.log")
    good_size = segment.stat().st_size
    with segment.open("ab") as handle:
        handle.write(encode(message(4))[:-7])  # the crash happened in the middle of a write
    again = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await again.open()
    assert again.depth == 3
    assert segment.stat().st_size == good_size
    await again.close()


async def test_concurrent_appends_share_writes(tmp_path: Path, fsyncs: list[str]) -> None:
    outbox = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await outbox.open()
    fsyncs.clear()
    await asyncio.gather(*(outbox.append([message(i)]) for i in range(100)))
    assert outbox.depth == 100
    segment_fsyncs = [path for path in fsyncs if path.endswith(".log")]
    assert 0 < len(segment_fsyncs) < 20  # group commit: far fewer fsyncs than appends
    await outbox.close()


async def test_a_full_outbox_refuses_with_503(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 64 * 1024, Recorder(ready=False))
    await outbox.open()
    big = message(1, b"x" * 40_000)
    await outbox.append([big])
    with pytest.raises(OutboxFull) as caught:
        await outbox.append([message(2, b"x" * 40_000)])
    assert caught.value.status == 503
    assert outbox.depth == 1
    await outbox.close()


async def test_replay_confirms_then_moves_the_cursor_and_survives_failures(
    tmp_path: Path,
) -> None:
    publisher = Recorder()
    publisher.fail_next = 2
    outbox = Outbox(tmp_path, 1 << 20, publisher)
    await outbox.open()
    await outbox.append([message(i) for i in range(150)])
    assert await outbox.drain(10)
    assert [m.message_id for m in publisher.published] == [f"m{i}" for i in range(150)]
    await asyncio.sleep(0.2)
    # Drained: the old segment is deleted, its space free for the next outage.
    segments = list(tmp_path.glob("segment-*.log"))
    assert [s.stat().st_size for s in segments] == [0]
    await outbox.close()
    again = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await again.open()
    assert again.depth == 0  # the cursor says all of it was confirmed
    await again.close()


async def test_records_for_a_vanished_exchange_go_to_unrouted(tmp_path: Path) -> None:
    publisher = Recorder()
    outbox = Outbox(tmp_path, 1 << 20, publisher, exchanges={"other"}, unrouted_exchange="park")
    await outbox.open()
    await outbox.append([message(1)])
    assert await outbox.drain(5)
    assert [m.exchange for m in publisher.published] == ["park"]
    await outbox.close()


async def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    outbox = Outbox(blocker / "outbox", 1 << 20, Recorder())
    with pytest.raises(OutboxUnavailable, match="cannot open the outbox"):
        await outbox.open()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: writes beyond it fail with ENOSPC (root only)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


async def test_a_full_disk_is_a_503_never_a_200(tiny_disk: Path) -> None:
    outbox = Outbox(tiny_disk, 1 << 30, Recorder(ready=False))
    await outbox.open()
    await outbox.append([message(1)])
    statuses = []
    for i in range(100):
        try:
            await outbox.append([message(i, b"y" * 8000)])
        except OutboxUnavailable as exc:
            statuses.append(exc.status)
            break
    assert statuses == [503]
    before = outbox.depth
    await outbox.close()
    again = Outbox(tiny_disk, 1 << 30, Recorder(ready=False))
    await again.open()
    assert again.depth == before  # what was acknowledged is all there, nothing half-written
    await again.close()


async def test_records_after_a_cursor_whose_segment_is_gone_are_kept(tmp_path: Path) -> None:
    (tmp_path / "cursor").write_text("5 5000\n")
    (tmp_path / "segment-notanumber.log").write_text("stray")
    outbox = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await outbox.open()
    await outbox.append([message(1), message(2), message(3)])
    await outbox.close()
    again = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await again.open()
    assert again.depth == 3
    await again.close()


class Refusing(Recorder):
    """Publishes like the broker would, except what ``refuse`` names: those are refused as
    unpublishable (``kind='unpublishable'``) or make the broker close the channel
    (``kind='close'``, which fails every message sent with it)."""

    def __init__(self, refuse: set[str], kind: str) -> None:
        super().__init__()
        self.refuse, self.kind = refuse, kind
        self.attempts: list[list[str]] = []

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        self.attempts.append([m.message_id for m in messages])
        bad = [m for m in messages if m.message_id in self.refuse]
        if not bad:
            self.published.extend(messages)
            return
        if self.kind == "unpublishable":
            good = [m for m in messages if m not in bad]
            self.published.extend(good)
            raise PublishFailed("unpublishable", "too big", [], [(m, "too big") for m in bad])
        raise PublishFailed(
            "broker_refused", "PRECONDITION_FAILED", [(m, None) for m in messages], []
        )


@pytest.mark.parametrize("kind", ["unpublishable", "close"])
async def test_a_poison_record_is_quarantined_and_never_blocks_the_rest(
    tmp_path: Path, kind: str
) -> None:
    publisher = Refusing({"m3", "m70"}, kind)
    outbox = Outbox(tmp_path, 1 << 22, publisher)
    await outbox.open()
    await outbox.append([message(i) for i in range(100)])
    assert await outbox.drain(20)
    published = [m.message_id for m in publisher.published]
    assert sorted(published) == sorted(f"m{i}" for i in range(100) if i not in (3, 70))
    assert len(published) == len(set(published))  # nothing confirmed is sent again
    kept = read_quarantine(tmp_path)
    assert [m.message_id for m, _ in kept] == ["m3", "m70"]
    assert outbox.quarantined == 2
    if kind == "close":  # found by sending alone, twice, what the failed batch held
        assert publisher.attempts.count(["m3"]) == 2
        assert publisher.attempts.count(["m70"]) == 2
    await outbox.close()
    again = Outbox(tmp_path, 1 << 22, Recorder(ready=False))
    await again.open()
    assert again.depth == 0  # quarantined records are not replayed after a restart either
    await again.close()


async def test_a_record_in_doubt_is_replayed_only_if_its_confirm_fails(tmp_path: Path) -> None:
    publisher = Recorder()
    outbox = Outbox(tmp_path, 1 << 20, publisher)
    await outbox.open()
    loop = asyncio.get_running_loop()
    acked, failed = loop.create_future(), loop.create_future()
    await outbox.append([message(1), message(2), message(3)], [acked, failed, None])
    await asyncio.sleep(0.3)
    assert publisher.published == []  # the head is in doubt: nothing overtakes a verdict
    acked.set_result(Basic.Ack(delivery_tag=1))
    failed.set_exception(ConnectionResetError("channel closed"))
    assert await outbox.drain(5)
    assert [m.message_id for m in publisher.published] == ["m2", "m3"]  # m1 was confirmed late
    await outbox.close()


async def test_a_backlog_the_broker_takes_nothing_of_is_stalled(tmp_path: Path) -> None:
    publisher = Recorder()
    publisher.fail_next = 10**6
    outbox = Outbox(tmp_path, 1 << 20, publisher, stall_seconds=1.0)
    await outbox.open()
    await outbox.append([message(1)])
    assert not outbox.stalled
    await asyncio.sleep(1.6)
    assert outbox.stalled
    publisher.fail_next = 0
    assert await outbox.drain(10)
    assert not outbox.stalled
    await outbox.close()


async def test_a_poison_record_is_not_sent_again_while_its_quarantine_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = Refusing({"m2"}, "unpublishable")
    outbox = Outbox(tmp_path, 1 << 22, publisher)
    await outbox.open()
    failures = [OSError(28, "No space left on device")] * 3
    real_add = outbox.spool.quarantine_file.add

    def add(frames: list[bytes]) -> None:
        if failures:
            raise failures.pop()
        real_add(frames)

    monkeypatch.setattr(outbox.spool.quarantine_file, "add", add)
    await outbox.append([message(i) for i in range(5)])
    assert await outbox.drain(20)
    assert sum(attempt.count("m2") for attempt in publisher.attempts) == 1  # refused once
    assert [m.message_id for m, _ in read_quarantine(tmp_path)] == ["m2"]
    await outbox.close()


class Nacking(Recorder):
    """The broker nacks ``m0`` every time (a queue that can never take it); the rest go."""

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        bad = [m for m in messages if m.message_id == "m0"]
        self.published.extend(m for m in messages if m not in bad)
        if bad:
            raise PublishFailed("nacked", "nack", [(m, None) for m in bad], [])


async def test_a_record_always_refused_goes_behind_the_others_and_the_cursor_moves_on(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path, 1 << 22, Nacking())
    await outbox.open()
    await outbox.append([message(i) for i in range(200)])
    deadline = asyncio.get_running_loop().time() + 20
    while outbox.depth > 1:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    await outbox.close()
    again = Outbox(tmp_path, 1 << 22, Recorder(ready=False))
    await again.open()
    assert again.depth == 1  # only the refused one: the cursor is past the 199 others
    await again.close()


async def test_when_the_broker_takes_nothing_the_replayer_backs_off(tmp_path: Path) -> None:
    """Every publish nacked (a full queue with reject-publish): no requeue storm, a backoff."""

    class NackingAll(Recorder):
        attempts = 0

        async def publish(
            self, messages: Sequence[Outbound], deadline: float | None = None
        ) -> None:
            self.attempts += 1
            raise PublishFailed("nacked", "nack", [(m, None) for m in messages], [])

    publisher = NackingAll()
    outbox = Outbox(tmp_path, 1 << 22, publisher)
    await outbox.open()
    await outbox.append([message(i) for i in range(300)])
    await asyncio.sleep(2.0)
    assert publisher.attempts <= 8  # 0.2 s doubling: about 4 in 2 s
    assert outbox.depth == 300  # nothing requeued, nothing lost
    await outbox.close()


def oldest_age() -> float:
    value = metrics.REGISTRY.get_sample_value("bridge_outbox_oldest_age_seconds")
    assert value is not None
    return value


async def test_the_oldest_waiting_event_s_age_is_reported_and_grows_while_nothing_happens(
    tmp_path: Path,
) -> None:
    """``bridge_outbox_oldest_age_seconds``: from the head's receive time, on writes, on the
    watchdog's tick (no write, no replay), after a restart, and 0 once drained or closed."""
    publisher = Recorder(ready=False)  # a broker that is away: the backlog stays
    outbox = Outbox(tmp_path, 1 << 20, publisher)
    await outbox.open()
    assert oldest_age() == 0
    received = datetime.now(UTC) - timedelta(seconds=120)
    await outbox.append(
        [
            dataclasses.replace(message(1), timestamp=received),
            dataclasses.replace(message(2), timestamp=received + timedelta(seconds=60)),
        ]
    )
    first = oldest_age()
    assert 120 <= first < 125  # the head's, not the newest's
    await asyncio.sleep(2.5)  # no write, no replay: only the watchdog's tick reports it
    assert oldest_age() >= first + 1.5
    await outbox.close()
    assert oldest_age() == 0  # nothing open: this process holds no backlog
    again = Outbox(tmp_path, 1 << 20, publisher)
    await again.open()
    assert oldest_age() >= 122  # read back from disk: still counted from when it was received
    publisher.ready = True
    assert await again.drain(10)
    assert oldest_age() == 0
    await again.close()


async def test_a_requeued_record_keeps_its_age(tmp_path: Path) -> None:
    """A record written again behind the others (the replayer's requeue: a copy appended, the
    old one settled, the spool flagged) is still the oldest, though no longer the head."""
    outbox = Outbox(tmp_path, 1 << 20, Recorder(ready=False))
    await outbox.open()
    now = datetime.now(UTC)
    stuck = dataclasses.replace(message(1), timestamp=now - timedelta(seconds=600))
    await outbox.append([stuck, dataclasses.replace(message(2), timestamp=now)])
    await outbox.append([stuck])  # as Replayer._requeue_stuck does
    outbox.spool.records[0].settled = True
    outbox.spool.requeued = True
    await outbox.advance()
    assert outbox.spool.records[0].message.message_id == "m2"  # the head is young now
    assert oldest_age() >= 600  # and the oldest still counts
    await outbox.close()
