"""YAML that a user hands draftsmith (recipes, overrides, Serve configs), read with limits.

PyYAML's safe loader constructs no objects, but it still (a) keeps the last of two equal keys, so a recipe with
a section written twice silently loses the first, and (b) expands aliases, so 570 bytes of nested `*a` lists
become gigabytes (the "billion laughs"). Here a duplicated key is an error naming both lines, an alias may only
stand for a scalar (an alias of a list or mapping is what multiplies), and the text has a size limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # far beyond any recipe or Serve config; a file this large is not one


class YamlInputError(ValueError):
    """The YAML cannot be accepted; the message names the file and line."""


class _LimitedLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and not isinstance(target, yaml.ScalarNode):
                raise yaml.MarkedYAMLError(
                    problem=f"alias *{event.anchor} stands for a list or mapping, which draftsmith does not "
                            "expand (it lets a few bytes grow without bound); write the values out",
                    problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.MarkedYAMLError(
                        problem=f"key {key!r} appears twice (lines {seen[key]} and {line}); PyYAML would keep the "
                                "last one silently: merge them into one",
                        problem_mark=key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _one_line(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {problem}"


def _check_size(text: str, source: str, max_bytes: int) -> None:
    if len(text.encode()) > max_bytes:
        raise YamlInputError(f"{source}: {len(text.encode()):,} bytes, more than the {max_bytes:,} a YAML input "
                             "may have; is this the right file?")


def load_yaml(text: str, source: str, *, max_bytes: int = MAX_BYTES) -> Any:
    """The data in `text`; YamlInputError (one line: `source:LINE: problem`) for invalid or refused YAML."""
    _check_size(text, source, max_bytes)
    try:
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlInputError(f"not valid YAML: {_one_line(exc, source)}") from None


def compose_yaml(text: str, source: str, *, max_bytes: int = MAX_BYTES) -> yaml.Node | None:
    """The node tree of `text` (for line numbers of keys), with the same limits as `load_yaml`."""
    _check_size(text, source, max_bytes)
    try:
        return yaml.compose(text, Loader=_LimitedLoader)
    except yaml.YAMLError as exc:
        raise YamlInputError(f"not valid YAML: {_one_line(exc, source)}") from None


def read_yaml_file(path: str | Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """`load_yaml` of a file; a missing or unreadable file is one line too."""
    path = Path(path)
    if not path.is_file():
        raise YamlInputError(f"{path}: no such file")
    if path.stat().st_size > max_bytes:
        raise YamlInputError(f"{path}: {path.stat().st_size:,} bytes, more than the {max_bytes:,} a YAML input may "
                             "have; is this the right file?")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlInputError(f"{path}: cannot be read as text ({exc})") from None
    return load_yaml(text, str(path), max_bytes=max_bytes)
