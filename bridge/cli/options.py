"""What the sub-commands share: the ``--config`` option, the sub-parser registry's shape, and the
quick start that ``--help`` and ``serve --help`` print."""

from __future__ import annotations

import argparse
import os
from typing import Any, Protocol

DEFAULT_CONFIG = "config/bridge.yaml"

# Only files of the repository, or what `make run` generates (.local/keys): as README.md's
# "Quick start" and the Makefile's `run` target say.
QUICK_START = """\
quick start (README.md, "Quick start"):
  make run                             # broker, dev keys in .local/keys, serve on 127.0.0.1:8080
  .venv/bin/events-bridge tail         # in a second terminal: print what is published
  .venv/bin/events-bridge simulate --url http://127.0.0.1:8080/webhook \\
      --key .local/keys/private/pub-key-dev.key.pem --key-path /prod/keys/pub-key-dev.pem \\
      --client-id events-bridge-dev \\
      tests/data/adobe-samples/events/imaging_lightroom-job-status_succeeded.json

Every command reads its settings from the YAML config (default config/bridge.yaml), which reads
BRIDGE_* environment variables; see README.md, "Configuration".
"""


class Subparsers(Protocol):
    """What ``add_subparsers()`` returns, as far as the commands use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def config_arg(parser: argparse.ArgumentParser) -> None:
    # BRIDGE_CONFIG: where an installation keeps it (the image: /etc/events-bridge/bridge.yaml),
    # so that `events-bridge tail` there needs no --config.
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BRIDGE_CONFIG") or DEFAULT_CONFIG,
        metavar="FILE",
        help=f"YAML configuration (default: $BRIDGE_CONFIG, else {DEFAULT_CONFIG})",
    )
