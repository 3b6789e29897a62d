"""``broker.tls`` files that cannot be used (SPEC §8): ``serve`` and ``check-config`` exit 78 with
one line naming the key and the file, no traceback, before any connection. The shipped config,
with its variables (``BRIDGE_AMQP_CA_FILE``, ``BRIDGE_AMQP_CERT_FILE``, ``..._KEY_FILE``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.certs import Authority
from tests.processes import cli, free_port

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "bridge.yaml"


def at(variable: str) -> str:
    """Where the shipped file reads ``variable``, as a problem names it: ``(bridge.yaml:N)``."""
    lines = SHIPPED.read_text().splitlines()
    (number,) = [n for n, line in enumerate(lines, 1) if f"${{{variable}:-}}" in line]
    return f"(bridge.yaml:{number})"


def files(folder: Path) -> dict[str, Path]:
    """Good and bad files, by role."""
    ca = Authority.create(folder / "ca")
    pair, other = ca.issue("client", client=True), ca.issue("other", client=True)
    (folder / "text.pem").write_text("not a certificate\n")
    (folder / "a-folder").mkdir()
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted = folder / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return {
        "ca": ca.cert_file,
        "cert": pair.cert,
        "key": pair.key,
        "other_key": other.key,
        "missing": folder / "missing.pem",
        "text": folder / "text.pem",
        "folder": folder / "a-folder",
        "encrypted": encrypted,
    }


# variable values by role, and the one line expected (after "<key>: ")
CASES = {
    "missing ca_file": (
        {"CA": "missing"},
        "broker.tls.ca_file: {missing}: no such file " + at("BRIDGE_AMQP_CA_FILE"),
    ),
    "ca_file not PEM": (
        {"CA": "text"},
        "broker.tls.ca_file: {text}: not a PEM certificate bundle (NO_CERTIFICATE_OR_CRL_FOUND)",
    ),
    "key_file not a file": (
        {"CERT": "cert", "KEY": "folder"},
        "broker.tls.key_file: {folder}: not a file " + at("BRIDGE_AMQP_KEY_FILE"),
    ),
    "key_file not PEM": (
        {"CERT": "cert", "KEY": "text"},
        "broker.tls.key_file: {text}: not a PEM private key",
    ),
    "key_file encrypted": (
        {"CERT": "cert", "KEY": "encrypted"},
        "broker.tls.key_file: {encrypted}: an encrypted private key "
        "(there is no passphrase setting: give the key unencrypted)",
    ),
    "key_file of another certificate": (
        {"CERT": "cert", "KEY": "other_key"},
        "broker.tls.key_file: {other_key}: not the private key of broker.tls.cert_file {cert}",
    ),
    "cert_file not PEM": (
        {"CERT": "text", "KEY": "key"},
        "broker.tls.cert_file: {text}: not a PEM certificate",
    ),
    "cert_file without key_file": (
        {"CERT": "cert"},
        "broker.tls.key_file: is required with broker.tls.cert_file "
        "(a certificate and its private key) " + at("BRIDGE_AMQP_CERT_FILE"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_tls_file_is_one_line_and_exit_78(tmp_path: Path, case: str) -> None:
    roles, expected = CASES[case]
    paths = files(tmp_path)
    env = {
        "BRIDGE_AMQP_URL": "amqps://u:secret@127.0.0.1:5691/",
        "BRIDGE_CLIENT_IDS": "test-client",
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "BRIDGE_LOG_FORMAT": "json",
        **{f"BRIDGE_AMQP_{name}_FILE": "" for name in ("CA", "CERT", "KEY")},
        **{f"BRIDGE_AMQP_{name}_FILE": str(paths[role]) for name, role in roles.items()},
    }
    line = expected.format(**paths)
    checked = cli("check-config", "--config", str(SHIPPED), env=env)
    served = cli("serve", "--config", str(SHIPPED), env=env, timeout=30)
    assert (checked.returncode, checked.stdout, checked.stderr) == (78, "", f"{SHIPPED}: {line}\n")
    assert (served.returncode, served.stdout) == (78, "")
    assert served.stderr == f"events-bridge: invalid config {SHIPPED}: {line}\n"
    assert not (tmp_path / "outbox").exists()  # stopped before anything started


def test_an_unreadable_key_is_one_line_and_exit_78(tmp_path: Path) -> None:
    """Mode 000. Root reads such a file all the same: as root, the CLI runs without the
    capabilities that let it (``setpriv``), as an unprivileged user would."""
    paths = files(tmp_path)
    paths["key"].chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to read files without CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {
        **os.environ,
        "BRIDGE_AMQP_URL": "amqps://127.0.0.1:5691/",
        "BRIDGE_CLIENT_IDS": "test-client",
        "BRIDGE_AMQP_CA_FILE": "",
        "BRIDGE_AMQP_CERT_FILE": str(paths["cert"]),
        "BRIDGE_AMQP_KEY_FILE": str(paths["key"]),
    }
    where = at("BRIDGE_AMQP_KEY_FILE")
    line = f"broker.tls.key_file: {paths['key']}: not readable by this process {where}"
    shown = {"check-config": f"{SHIPPED}: ", "serve": f"events-bridge: invalid config {SHIPPED}: "}
    for command, start in shown.items():
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "bridge", command, "--config", str(SHIPPED)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert (done.returncode, done.stderr) == (78, f"{start}{line}\n")
