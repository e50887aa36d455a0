"""Walking an API's OpenAPI document: what every operation must declare, and
requests that put out-of-range integers into every numeric parameter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BEYOND_64_BITS = {
    "integer": ["9223372036854775808", "-9223372036854775809"],
    "number": ["9.5e174", "inf"],
}


def undocumented_operations(schema: dict[str, Any]) -> list[str]:
    """``METHOD path`` of each operation without a summary or a description."""
    return [
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if not operation.get("summary", "").strip() or not operation.get("description", "").strip()
    ]


def unsecured_operations(schema: dict[str, Any], *, public: set[str]) -> list[str]:
    """``METHOD path`` of each operation that declares no security scheme, except on
    the ``public`` paths."""
    return [
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "security" not in operation and path not in public
    ]


def _kind(parameter: dict[str, Any]) -> str | None:
    schema = parameter.get("schema", {})
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") in ("integer", "number"):
            return str(option["type"])
    return None


def _plausible(parameter: dict[str, Any]) -> str:
    schema = parameter.get("schema", {})
    for option in [schema, *schema.get("anyOf", [])]:
        if "enum" in option:
            return str(option["enum"][0])
        if option.get("type") in ("integer", "number"):
            return "1"
    return "x"


def numeric_probes(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """``(method, path, query)`` for each numeric path or query parameter of each
    operation and each value beyond what a 64-bit integer (or a float) holds; the
    other parameters get plausible values."""
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            parameters = [
                p for p in operation.get("parameters", []) if p["in"] in ("path", "query")
            ]
            for probed in parameters:
                kind = _kind(probed)
                if kind is None:
                    continue
                for value in BEYOND_64_BITS[kind]:
                    url, query = path, {}
                    for parameter in parameters:
                        given = value if parameter is probed else _plausible(parameter)
                        if parameter["in"] == "path":
                            url = url.replace("{" + parameter["name"] + "}", given)
                        elif parameter is probed or parameter.get("required"):
                            query[parameter["name"]] = given
                    yield method.upper(), url, query
