"""Read ``application_config.yaml`` into a validated ``Catalog``.

Every problem is reported with the file and the line it is on, whether it is a
YAML syntax error, a duplicate key, or a value the schema refuses: the YAML node
tree is kept next to the parsed data, and each validation error's location
(``demo/latest/wordcount/handler/image_url``) is walked through that tree to the
node it came from.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from labcloud.startup import StartupError
from user_api.catalog.schemas import Catalog

# Pydantic marks an error about a mapping's key (rather than its value) with this
# extra location element.
_KEY_MARKER = "[key]"


class CatalogError(StartupError, ValueError):
    """The application catalog is invalid; the message names file, line and problem."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class _CatalogYamlLoader(yaml.SafeLoader):
    """A safe loader whose mapping keys are always the text written in the file.

    Every key in the catalog is a name, so ``1.0:`` must mean the version "1.0",
    not the float 1.0 (which would then be refused as "not a string"); and a key
    written twice is an error instead of the silent last-one-wins of plain YAML.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        # Duplicates are looked for among the keys written in this mapping only: keys
        # brought in by a merge (``<<: *anchor``) may legitimately be overridden.
        first_seen: dict[str, yaml.Mark] = {}
        for key_node, _value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    "a key must be a plain name, not a list or a mapping",
                    key_node.start_mark,
                )
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in first_seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key_node.value!r} "
                    f"(first on line {first_seen[key_node.value].line + 1})",
                    key_node.start_mark,
                )
            first_seen[key_node.value] = key_node.start_mark
        self.flatten_mapping(node)
        mapping: dict[Hashable, Any] = {}
        for key_node, value_node in node.value:
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def read_catalog_text(path: Path) -> str:
    """The file's text, or ``CatalogError`` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from exc


def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog file at ``path``."""
    return parse_catalog(read_catalog_text(path), str(path))


def parse_catalog(text: str, source: str) -> Catalog:
    """Validate catalog ``text``; ``source`` names it in error messages."""
    root, data = _compose_and_construct(text, source)
    if root is None:
        raise CatalogError(
            f"{source}, line 1: the catalog is empty (write '{{}}' for a catalog "
            "without applications)"
        )
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, root, source) for error in exc.errors()]
        raise CatalogError("\n".join(problems)) from None


def _compose_and_construct(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    loader = _CatalogYamlLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        raise CatalogError(_describe_yaml_error(exc, source)) from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: {exc}") from None
    finally:
        loader.dispose()
    return root, data


def _describe_yaml_error(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = exc.problem or "invalid YAML"
    if exc.context:
        # Where the construct began matters when it is far from where it broke,
        # as with an unclosed bracket or quote.
        context = exc.context
        if exc.context_mark is not None and exc.problem_mark is not None:
            context += f" started on line {exc.context_mark.line + 1}"
        return f"{where}: {problem} ({context})"
    return f"{where}: {problem}"


def _describe(error: ErrorDetails, root: yaml.Node, source: str) -> str:
    loc = tuple(error["loc"])
    names = [str(part) for part in loc if part != _KEY_MARKER]
    if error["type"] == "missing":
        path, message = names[:-1], f"missing required key {names[-1]!r}"
    elif error["type"] == "extra_forbidden":
        path, message = names[:-1], f"unknown key {names[-1]!r}"
    elif error["type"] in ("dict_type", "model_type"):
        path, message = names, f"expected a mapping (key: value), found {_kind(error['input'])}"
    elif error["type"] == "list_type":
        path, message = names, f"expected a list, found {_kind(error['input'])}"
    elif error["type"] == "too_short":
        path, message = names, "must not be empty"
    else:
        path, message = names, error["msg"]
    # A missing key has no node of its own: point at the mapping that lacks it.
    node = _node_at(root, loc[:-1] if error["type"] == "missing" else loc)
    where = "/".join(path) or "top level"
    return f"{source}, line {node.start_mark.line + 1}: {where}: {message}"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"the value {value!r}"


def _node_at(root: yaml.Node, loc: Sequence[int | str]) -> yaml.Node:
    """The deepest node that ``loc`` reaches; for a mapping entry, its key's node,
    whose line is where a reader looks for ``handler:`` or ``timeout: 0``."""
    node = root
    for index, part in enumerate(loc):
        if part == _KEY_MARKER:
            continue
        is_last = index == len(loc) - 1 or (index == len(loc) - 2 and loc[index + 1] == _KEY_MARKER)
        if isinstance(node, yaml.MappingNode):
            entry = next(
                (
                    (key, value)
                    for key, value in node.value
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part)
                ),
                None,
            )
            if entry is None:
                return node
            key_node, value_node = entry
            node = key_node if is_last else value_node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node
