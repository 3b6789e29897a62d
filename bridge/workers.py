"""``serve --workers N``: N worker processes sharing one port, and the parent that minds them.

Python runs one request at a time per process; a box with spare cores serves more with more
processes. Each worker is a whole ``events-bridge serve`` (``--worker K/N``): its own event loop,
its own broker connection, its own outbox folder; all bind the same port with ``SO_REUSEPORT``
and the kernel spreads connections among them.

The parent only supervises:

- SIGTERM or SIGINT: passed on to every worker, which finishes its requests and stops; the
  parent exits when all have, with 0 if all exited 0.
- SIGHUP: passed on; each worker reloads its configuration (workers log their own outcome).
- A worker that exits on its own (a crash, a SIGKILL, a fatal start-up problem such as a missing
  passive topology): the others are stopped the same clean way and the parent exits with the
  worker's code (1 when the worker died by a signal), so the service manager restarts the whole.

Metrics: every worker writes its values under ``PROMETHEUS_MULTIPROC_DIR`` (a private folder the
parent makes and removes), and whichever worker answers ``/metrics`` reports the sum of all.

Outbox: worker 0 uses ``outbox.dir`` itself, worker K ``outbox.dir/worker-K``; worker 0 also
replays folders left by a run with more workers (see ``bridge.app``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog

MAX_WORKERS = 64
PARENT_PID = "EVENTS_BRIDGE_PARENT_PID"  # so a worker knows its parent even if it died early
POLL_SECONDS = 0.2

log = structlog.get_logger("bridge.workers")


@dataclass(frozen=True)
class WorkerSpec:
    """Which worker this process is: ``index`` of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        index, _, count = text.partition("/")
        spec = cls(int(index), int(count))
        if not 0 <= spec.index < spec.count <= MAX_WORKERS:
            raise ValueError(text)
        return spec

    def outbox_dir(self, base: Path) -> Path:
        return base if self.index == 0 else base / f"worker-{self.index}"


SINGLE = WorkerSpec(0, 1)


def stranded_outbox_dirs(base: Path, count: int) -> list[Path]:
    """Outbox folders of workers that no longer exist (a previous run had more workers)."""
    found = []
    for path in sorted(base.glob("worker-*")) if base.is_dir() else []:
        suffix = path.name.removeprefix("worker-")
        if path.is_dir() and suffix.isdigit() and int(suffix) >= count:
            found.append(path)
    return found


def supervise(config_path: str, count: int) -> int:
    """Run ``count`` workers until a signal stops them or one of them exits."""
    metrics_dir = tempfile.mkdtemp(prefix="events-bridge-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, PARENT_PID: str(os.getpid())}
    stopping: list[str] = []
    workers: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()
    forward = _forwarder(workers, stopping, signalled)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        for index in range(count):
            if stopping:  # a signal came while starting: start no more
                break
            workers.append(_spawn(config_path, index, count, env))
        log.info("workers_started", workers=count, pids=[w.pid for w in workers])
        code = _mind(workers, stopping, signalled)
        # A worker stopped by our SIGTERM before it could handle it stopped cleanly too.
        failed = [w.returncode for w in workers if w.returncode not in (0, -signal.SIGTERM)]
        if code == 0 and failed:
            code = failed[0] if failed[0] > 0 else 1
        log.info("workers_stopped", exit_codes=[w.returncode for w in workers])
        return code
    finally:
        _stop(workers, signalled)
        for worker in workers:
            worker.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _forwarder(
    workers: list[subprocess.Popen[bytes]], stopping: list[str], signalled: set[int]
) -> Callable[[int, FrameType | None], None]:
    """The parent's signal handler: SIGHUP passed on to every running worker; the first SIGTERM
    or SIGINT recorded in ``stopping`` and passed on."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGHUP)
            return
        if not stopping:
            stopping.append(signal.Signals(signum).name)
            _stop(workers, signalled)

    return forward


def _spawn(
    config_path: str, index: int, count: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--config",
            config_path,
            "--worker",
            f"{index}/{count}",
        ],
        env=env,
    )


def _mind(workers: list[subprocess.Popen[bytes]], stopping: list[str], signalled: set[int]) -> int:
    """Wait until every worker has exited; stop them all when asked to (``stopping``) or when
    one exits on its own, whose exit code (1 for a signal) is returned; else 0."""
    code = 0
    while any(w.poll() is None for w in workers):
        if stopping:
            _stop(workers, signalled)  # again: a worker started after the signal gets it too
        else:
            gone = next((w for w in workers if w.poll() is not None), None)
            if gone is not None:
                code = gone.returncode if gone.returncode > 0 else 1
                log.error(
                    "worker_exited",
                    pid=gone.pid,
                    exit_code=gone.returncode,
                    action="stopping the other workers",
                )
                stopping.append("worker_exited")
                _stop(workers, signalled)
        time.sleep(POLL_SECONDS)
    return code


def _stop(workers: list[subprocess.Popen[bytes]], signalled: set[int]) -> None:
    """SIGTERM to every running worker, once each (``signalled``: those that had it)."""
    for worker in workers:
        if worker.poll() is None and worker.pid not in signalled:
            signalled.add(worker.pid)
            worker.send_signal(signal.SIGTERM)
