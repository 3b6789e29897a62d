"""Reading YAML with the problems' paths and lines: the engine under ``bridge.config``.

Owns: walking a composed YAML tree, replacing ``${VAR}``/``${VAR:-default}`` inside scalar
values, and typed getters that record a problem (``path: message (file:line)``) instead of
raising, so one run reports every problem; :func:`locate` finds the node (and so the line) a
problem found later, by comparing parsed values, is about. Does not: know any of events-bridge's
settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def locate(node: yaml.Node | None, *steps: str | int) -> yaml.Node | None:
    """The node ``steps`` below ``node`` (mapping keys, list indexes), or None when absent.

    For problems found by comparing values already parsed, so they can name their line too. A
    duplicate key resolves to its first occurrence, the one :meth:`Doc.mapping` keeps.
    """
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, yaml.SequenceNode) or not 0 <= step < len(node.value):
                return None
            node = node.value[step]
        elif isinstance(node, yaml.MappingNode):
            node = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == step),
                None,
            )
        else:
            return None
    return node


class Doc:
    """Walks the composed YAML tree, collecting problems instead of stopping at the first."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, path: str, node: yaml.Node | None, message: str) -> None:
        where = f" ({self.source}:{node.start_mark.line + 1})" if node is not None else ""
        self.problems.append(f"{path or '(top)'}: {message}{where}")

    def mapping(self, node: yaml.Node | None, path: str, allowed: set[str]) -> Section:
        section = Section(self, path, node)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return section
        if not isinstance(node, yaml.MappingNode):
            self.fail(path, node, "expected a mapping of keys to values")
            return section
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.fail(sub, key_node, f"unknown key (allowed here: {hint})")
            elif key in section.items:
                self.fail(sub, key_node, "duplicate key")
            else:
                section.items[key] = value_node
        return section

    def scalar(self, node: yaml.Node, path: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(path, node, "expected a single value, not a list or mapping")
            return None
        missing: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name, "")
            if value == "" and default is not None:
                return default
            if name not in self.environ:
                missing.append(name)
            return value

        text = _VAR.sub(replace, node.value)
        if missing:
            self.fail(path, node, f"environment variable {missing[0]} is not set")
            return None
        return text

    def typed(self, node: yaml.Node, path: str) -> Any:
        """A scalar's value with its YAML type, after variables are replaced."""
        text = self.scalar(node, path)
        if text is None:
            return None
        if isinstance(node, yaml.ScalarNode) and node.style is None:  # plain: let YAML type it
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            if isinstance(value, str | int | float | bool):
                return value
        return text


class Section:
    """One mapping of the YAML file, with typed getters that record problems."""

    def __init__(self, doc: Doc, path: str, node: yaml.Node | None) -> None:
        self.doc, self.path, self.node = doc, path, node
        self.items: dict[str, yaml.Node] = {}

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: T, convert: Callable[[str], T], expected: str) -> T:
        node = self.items.get(key)
        if node is None:
            return default
        text = self.doc.scalar(node, self._sub(key))
        if text is None:
            return default
        try:
            return convert(text)
        except (ValueError, TypeError, KeyError):
            self.doc.fail(self._sub(key), node, f"expected {expected}, got {text!r}")
            return default

    def string(self, key: str, default: str, pattern: re.Pattern[str] | None = None) -> str:
        def convert(text: str) -> str:
            if not text.strip() or (pattern is not None and not pattern.match(text)):
                raise ValueError
            return text

        expected = (
            "a non-empty string" if pattern is None else f"a value matching {pattern.pattern}"
        )
        return self.get(key, default, convert, expected)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        def convert(text: str) -> float:
            value = float(text)
            if not low <= value <= high:
                raise ValueError
            return value

        return self.get(key, default, convert, f"a number from {low:g} to {high:g}")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        def convert(text: str) -> int:
            value = int(text.replace("_", ""))
            if not low <= value <= high:
                raise ValueError
            return value

        return self.get(key, default, convert, f"a whole number from {low} to {high}")

    def boolean(self, key: str, default: bool) -> bool:
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        return self.get(key, default, lambda t: words[t.strip().lower()], "true or false")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(text: str) -> str:
            if text not in choices:
                raise ValueError
            return text

        return self.get(key, default, convert, "one of " + ", ".join(choices))

    def strings(self, key: str) -> tuple[str, ...] | None:
        """A YAML list of strings, or one comma-separated string (handy from an env variable)."""
        node = self.items.get(key)
        if node is None:
            return None
        path = self._sub(key)
        if isinstance(node, yaml.SequenceNode):
            values: list[str | None] = [
                self.doc.scalar(item, f"{path}[{i}]") for i, item in enumerate(node.value)
            ]
        else:
            text = self.doc.scalar(node, path)
            if text is None:
                return None
            values = list(text.split(","))
        return tuple(v.strip() for v in values if v is not None and v.strip())

    def sequence(self, key: str) -> list[tuple[str, yaml.Node]]:
        """The items of a YAML list under ``key`` with their paths (empty when absent)."""
        node = self.items.get(key)
        if node is None:
            return []
        path = self._sub(key)
        if not isinstance(node, yaml.SequenceNode):
            self.doc.fail(path, node, "expected a list")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]

    def scalars(self, key: str) -> dict[str, Any]:
        """A mapping of names to plain values (strings, numbers, booleans), e.g. AMQP arguments."""
        node = self.items.get(key)
        if node is None:
            return {}
        path = self._sub(key)
        if not isinstance(node, yaml.MappingNode):
            self.doc.fail(path, node, "expected a mapping of names to values")
            return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            value = self.doc.typed(value_node, f"{path}.{name}")
            if value is not None:
                result[name] = value
        return result

    def value(self, key: str) -> Any:
        """A scalar with its YAML type (``5`` is a number, ``"5"`` a string), or a list of them."""
        node = self.items.get(key)
        if node is None:
            return None
        path = self._sub(key)
        if isinstance(node, yaml.SequenceNode):
            return [self.doc.typed(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return self.doc.typed(node, path)

    def has(self, key: str) -> bool:
        return key in self.items
