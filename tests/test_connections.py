"""The connection guard's pure parts: the bound and the descriptor alarm (the daemon's
connections under floods are in test_hostile.py)."""

from __future__ import annotations

import subprocess
import sys

from bridge.connections import RESERVED_DESCRIPTORS, connection_bound


def test_the_bound_leaves_descriptors_for_everything_else() -> None:
    assert connection_bound(1024, 1_048_576) == 1024
    assert connection_bound(1024, 256) == 256 - RESERVED_DESCRIPTORS
    assert connection_bound(1024, 10) == 1


def test_running_out_of_descriptors_is_logged_whatever_the_loop() -> None:
    """uvloop drops a connection it cannot accept without a word: the once-a-second look at
    the open descriptors is what tells the operator."""
    script = """
import os, resource, tempfile
import structlog
from structlog.testing import capture_logs
from bridge.connections import DescriptorAlarm
used = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
alarm = DescriptorAlarm()
with capture_logs() as logs:
    alarm.check()
    assert not logs, logs
    held = [tempfile.TemporaryFile() for _ in range(15)]
    alarm.check()
print(logs[0]["event"], logs[0]["error"])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("descriptors_exhausted ")
    assert "descriptors open" in done.stdout
