"""``events-bridge keys generate``: a development RSA-2048 key pair, named as Adobe names its
keys (Adobe holds the real private keys)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.cli.options import Subparsers


def add_keys(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="development key pairs")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "generate",
        help="write a development RSA-2048 key pair",
        description="Write DIR/prod/keys/pub-key-NAME.pem (serve DIR with "
        "BRIDGE_KEY_BASE_URL=file://DIR) and DIR/private/pub-key-NAME.key.pem "
        "(for simulate --key). Development only: Adobe holds the real private keys.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--name", help="key name (default: 10 random characters, as Adobe's)")
    p.add_argument("--force", action="store_true", help="replace an existing pair")
    p.set_defaults(run=run_keys_generate)


def run_keys_generate(args: argparse.Namespace) -> int:
    from bridge.simulate import generate_keys

    keys = generate_keys(args.dir, args.name, args.force)
    print(f"private key: {keys.private_key}")
    print(f"public key:  {keys.public_key}")
    print(f"key path:    {keys.key_path}")
    print(f"serve with:  BRIDGE_KEY_BASE_URL={keys.base_url}")
    return 0
