"""Reading the YAML files users write (campaigns, launcher settings, hardware profiles) strictly: UTF-8 text only,
and a key given twice in one mapping is an error (PyYAML's own loaders keep the last one silently).

Every problem is one line naming the file and, where YAML knows it, the line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError


class YamlFileError(ValueError):
    """A file that is not readable, not UTF-8 text, or not valid YAML; the message is one line."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (merge keys `<<:` may still override)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if seen is not None:
                    raise ConstructorError(None, None, f"key {key!r} is given twice (first on line {seen.line + 1})",
                                           key_node.start_mark)
                first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; YamlFileError (one line, starting with `source`) when it is not valid."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.reader.ReaderError as err:
        shown = repr(chr(err.character)) if isinstance(err.character, int) else repr(err.character)
        raise YamlFileError(f"{source}: not valid YAML: the character {shown} (at character {err.position + 1}) "
                            "is not allowed in a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise YamlFileError(f"{source}: not valid YAML{where}: {problem}") from None


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """The YAML document in the file at `path` (`what` names it in the errors, e.g. 'campaign file')."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise YamlFileError(f"{path!s:.200}: cannot read the {what} ({getattr(err, 'strerror', None) or err})") \
            from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlFileError(f"{path}: the {what} is not UTF-8 text (byte {data[err.start]:#04x} at offset "
                            f"{err.start}); save it as UTF-8 YAML") from None
    return parse_yaml(text, str(path))
