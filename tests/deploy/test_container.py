"""The Containerfiles, checked offline: hadolint finds nothing at the warning level, and the build
context (``.dockerignore``, an allow-list) lets in every file the image copies. The image itself
is built and run by ``make test-image`` (tests/image)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILES = [
    ROOT / "deploy" / "container" / "Containerfile",
    ROOT / "deploy" / "container" / "rabbitmq4" / "Containerfile",
]
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(path: Path) -> None:
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install -y curl\n")  # untagged, unpinned, as root
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1


def copied_sources() -> list[str]:
    """What the image's Containerfile copies from the build context."""
    text = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    sources: list[str] = []
    for line in text.splitlines():
        match = re.match(r"COPY\s+(?!--from)(.+)", line)
        if match:
            sources.extend(match.group(1).split()[:-1])
    return sources


def test_the_build_context_lets_in_every_file_the_image_copies() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = copied_sources()
    assert "bridge" in sources
    assert "config/bridge.yaml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
