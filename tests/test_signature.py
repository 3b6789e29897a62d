"""Signature rules, pure: the vectors' RSA checks, key paths and key strength."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bridge.adobe.signature import BadKey, key_path_allowed, load_public_key, signed_pairs, verify
from tests.helpers import KEY_PATH, SAMPLES, SigningKey

SIGS = SAMPLES / "signatures"
CASES = json.loads((SIGS / "vectors.json").read_text())["cases"]


@pytest.mark.parametrize(
    "path",
    [
        "/prod/keys/pub-key-Ptc2pD9vT9.pem",
        "/prod/keys/pub-key-IkpzhSpTw0.pem",
        "/prod/keys/pub-key-a_b-c.pem",
    ],
)
def test_adobe_key_paths_are_allowed(path: str) -> None:
    assert key_path_allowed(path)


@pytest.mark.parametrize(
    "path",
    [
        "@127.0.0.1:9/x.pem",
        "//evil/x.pem",
        "/../x",
        "/prod/keys/pub-key-a.pem?x",
        "/prod/keys/%2e%2e/pub-key-a.pem",
        "\\\\evil",
        "https://evil/x.pem",
        "/prod/keys/pub-key-" + "a" * 10_000 + ".pem",
        "/prod/keys/pub-key-.pem",
        "/prod/keys/pub-key-a.pem\n",
        "/junit/pub-key-1.pem",
        "/prod/keys/pub-key-a.pem#",
        "/prod/keys/../keys/pub-key-a.pem",
        "",
    ],
)
def test_tricky_key_paths_are_refused(path: str) -> None:
    assert not key_path_allowed(path)


def test_rsa_vectors_verify_as_adobe_published_them() -> None:
    # java-valid-single: signature N verifies with pub-key-N, over the exact body bytes only.
    case = next(c for c in CASES if c["id"] == "java-valid-single")
    body = (SIGS / case["body"]).read_bytes()
    for n in (1, 2):
        key = load_public_key((SIGS / case["keys"][f"/junit/pub-key-{n}.pem"]).read_bytes())
        signature = base64.b64decode(case["headers"][f"x-adobe-digital-signature-{n}"])
        assert verify(key, signature, body)
        assert not verify(key, signature, body + b" ")
    reserialized = (SIGS / "bodies" / "legacy_single.reserialized-with-spaces.body").read_bytes()
    assert not verify(key, signature, reserialized)


def test_signed_pairs_reads_both_pairs_and_explains_the_rest() -> None:
    signer = SigningKey.generate()
    headers = signer.headers(b"{}")
    pairs, problems = signed_pairs(headers)
    assert [p.key_path for p in pairs] == [KEY_PATH, KEY_PATH]
    assert problems == []
    headers["x-adobe-digital-signature-2"] = "some random String"
    headers["x-adobe-public-key1-path"] = "/junit/pub-key-1.pem"
    pairs, problems = signed_pairs(headers)
    assert pairs == []
    assert problems == ["signature 1: key path not allowed", "signature 2: not base64"]
    del headers["x-adobe-public-key2-path"]
    assert signed_pairs(headers) == ([], ["header missing: x-adobe-public-key2-path"])


def pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_weak_odd_and_broken_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    curve = ec.generate_private_key(ec.SECP256R1()).public_key()
    corrupt = (SIGS / "keys" / "aio-lib-events_invalidTestPubKey.as-published.b64.txt").read_bytes()
    for material, reason in (
        (pem(weak), "1024 bits"),
        (pem(curve), "not an RSA key"),
        (corrupt, "not a PEM"),
        (b"", "not a PEM"),
    ):
        with pytest.raises(BadKey, match=reason):
            load_public_key(material)


def test_core_modules_do_no_io() -> None:
    """The pure core never imports the network libraries (STYLE.md habit 1)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parent.parent / "bridge"
    core = [
        *sorted((root / "adobe").glob("*.py")),
        root / "routing.py",
        root / "message.py",
        root / "config.py",
        root / "errors.py",
    ]
    for path in core:
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
            )
        }
        assert not names & {"aiohttp", "aio_pika", "aiormq", "asyncio", "socket"}, path
