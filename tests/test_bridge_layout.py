"""The shape of ``bridge/``, guarded: a pure core, rooms of one responsibility, tests named after
what they test, one module that touches aiormq's internals."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = ROOT / "bridge"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# No I/O framework in the domain core: what Adobe sends, the rules, the messages, the config.
PURE_CORE = sorted(
    {
        *(f"bridge.adobe.{p.stem}" for p in (BRIDGE / "adobe").glob("*.py")),
        *(f"bridge.{p.stem}" for p in BRIDGE.glob("config*.py")),
        "bridge.authorize",
        "bridge.dedup",
        "bridge.errors",
        "bridge.frames",
        "bridge.message",
        "bridge.routing",
        "bridge.rules",
        "bridge.streams",
        "bridge.topology",
        "bridge.yamldoc",
    }
)
FRAMEWORKS = ("aiohttp", "aio_pika", "aiormq", "pamqp", "asyncio", "uvloop", "prometheus_client")


def modules() -> list[Path]:
    return sorted(BRIDGE.rglob("*.py"))


def test_the_pure_core_imports_no_io_framework() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in PURE_CORE)
        + f"print(sorted({{m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}}}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]", f"the pure core pulls in {found.stdout.strip()}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines; give a part a room of its own"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_over_80_lines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_only_bridge_channel_reaches_into_aiormq_internals() -> None:
    """The names of bridge/channel.py's docstring appear nowhere else in ``bridge/``."""
    internals = (
        "confirmations",
        "message_id_delivery_tag",
        "write_queue",
        "delivery_tag",
        "_confirm_delivery",
        "_on_confirm_frame",
        "ChannelFrame",
        "Returning",
        "max_content_size",
    )
    offenders = []
    for path in modules():
        if path == BRIDGE / "channel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internals:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiormq"):
                names = {a.name for a in node.names}
                if names & set(internals):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import {names}")
    assert offenders == []


def _names() -> set[str]:
    """Every module and package name of ``bridge`` (``bridge`` itself included)."""
    found = {"bridge"}
    for path in modules():
        found.add(path.parent.name if path.stem == "__init__" else path.stem)
    return found


def test_every_test_file_is_named_after_what_it_tests() -> None:
    """``tests/test_<module>[_<aspect>].py``, ``<module>`` a module or package of ``bridge``."""
    names = _names()
    strays = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        words = path.stem.removeprefix("test_").split("_")
        prefixes = {"_".join(words[:n]) for n in range(1, len(words) + 1)}
        if not prefixes & names:
            strays.append(path.name)
    assert strays == [], f"not named after a module of bridge/: {strays}"
