"""``events-bridge check-config``: validate the configuration; its problems are printed by
:func:`bridge.cli.main`, one line each (exit 78)."""

from __future__ import annotations

import argparse

from bridge.cli.options import Subparsers, config_arg


def add_check_config(sub: Subparsers) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate the configuration and exit",
        description="Print every problem with its YAML path and line. "
        "Exit 0 when valid, 78 when not.",
    )
    config_arg(p)
    p.set_defaults(run=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.declare import deprecations
    from bridge.link import redacted
    from bridge.tls import check_tls

    config = load_config(args.config)
    check_tls(config)  # certificates, keys and CA bundles that do not load, as `serve` does
    regs = ", ".join(f"{r.name} at {r.path}" for r in config.registrations)
    server, tls = config.server, config.server.tls
    host = f"[{server.host}]" if ":" in server.host else server.host
    listen = f"{'https' if tls.enabled else 'http'}://{host}:{server.port}"
    if tls.client_ca_file:
        listen += " (client certificates required)"
    print(
        f"{args.config}: valid ({len(config.registrations)} registration(s): {regs}; "
        f"listening {listen}; broker {redacted(config.broker.url)}; "
        f"key base {config.verification.key_base_url})"
    )
    for problem in deprecations(config.topology):
        print(f"warning: topology: {problem}")
    return 0
