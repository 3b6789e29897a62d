"""The container image under test (``make image`` builds it): podman pointed at the project's
store, containers and volumes named per test and removed afterwards, a key pair to sign with."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bridge
from tests.broker_node import podman_environment
from tests.conftest import ROOT
from tests.helpers import SigningKey, key_folder

IMAGE = f"localhost/events-bridge:{bridge.__version__}"
FIGURES = ROOT / ".local" / "image" / "test-image.json"


class Podman:
    """``podman`` on the project's store; everything it starts here is named ``<prefix>-…``."""

    def __init__(self, env: dict[str, str]) -> None:
        import os

        self.env = {**os.environ, **env}
        self.prefix = f"eb-test-{uuid.uuid4().hex[:6]}"
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {shlex.join(args)}: rc {done.returncode}\n{done.stderr}")
        return done

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def volume(self, what: str) -> str:
        name = self.name(what)
        self("volume", "create", name)
        self.volumes.append(name)
        return name

    def run(self, what: str, *args: str, command: tuple[str, ...] = ()) -> str:
        """``podman run -d`` as an operator runs it: host network, read-only root without
        tmpfs, no capabilities, no new privileges; ``command`` after the image."""
        name = self.name(what)
        self.containers.append(name)
        self(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            *args,
            IMAGE,
            *command,
        )
        return name

    def inspect(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self("inspect", name).stdout)
        return found[0]

    def logs(self, name: str) -> str:
        done = self("logs", name, check=False)
        return done.stdout + done.stderr

    def listed(self) -> set[str]:
        """Every container, pod, volume and network of the store, by name."""
        found: set[str] = set()
        for what, field in (
            ("ps", "Names"),
            ("pod", "Name"),
            ("volume", "Name"),
            ("network", "Name"),
        ):
            listing = ["ps", "-a"] if what == "ps" else [what, "ls"]
            found |= {
                f"{what}:{n}"
                for n in self(*listing, "--format", f"{{{{.{field}}}}}").stdout.split()
            }
        # kube play makes podman's own default network once; it is podman's, not a test's.
        return found - {"network:podman-default-kube-network"}

    def clean(self) -> None:
        for name in reversed(self.containers):
            self("rm", "-f", "-v", "-t", "0", name, check=False)
        for name in self.volumes:
            self("volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    runner = Podman(podman_environment())
    found = runner("image", "exists", IMAGE, check=False)
    if found.returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `make image` first (make test-image does)")
    before = runner.listed()
    yield runner
    runner.clean()
    left = runner.listed() - before
    assert not left, f"containers or volumes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    """A key pair, its public half where a container can read it (mounted at /keys)."""
    signer = SigningKey.generate()
    folder = tmp_path_factory.mktemp("image-keys")
    folder.chmod(0o755)  # uid 10001 in the container reads it
    key_folder(folder, signer)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return signer, folder


def http_json(url: str, timeout: float = 2) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_for(url: str, want: dict[str, Any], seconds: float = 60) -> dict[str, Any]:
    """Poll ``url`` until its JSON holds ``want``; the JSON."""
    deadline, seen = time.monotonic() + seconds, dict[str, Any]()
    while time.monotonic() < deadline:
        try:
            _, seen = http_json(url)
            if all(seen.get(k) == v for k, v in want.items()):
                return seen
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never said {want}; last: {seen}")


def record(**figures: Any) -> None:
    """Keep a figure for the closing note (``.local/image/test-image.json``)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps({**kept, **figures}, indent=2))
