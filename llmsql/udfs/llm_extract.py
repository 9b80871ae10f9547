"""LLM_EXTRACT(instruction, schema => 'name TYPE, ...', field, ...) -> STRUCT.

The schema is parsed into typed fields; the answer must be a JSON object (JSON-constrained
where the backend can), validated and converted field by field. Failures are NULL and
counted.

>>> s = parse_schema("name VARCHAR, year INTEGER")
>>> parse('{"name": "Up", "year": "2009"}', CallOptions(schema=s)).value
{'name': 'Up', 'year': 2009}
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable
from typing import Any

from llmsql.errors import PlanError
from llmsql.udfs.base import CallOptions, Parsed, SchemaField

DEFAULT_MAX_TOKENS = 128
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "1"):
        return True
    if s in ("false", "no", "0"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("boolean is not an integer")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"not an integer: {v!r}")
    return int(v)


def _to_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


# DuckDB type name -> (python converter, JSON-schema type, arrow type name)
TYPES: dict[str, tuple[Callable[[Any], Any], str, str]] = {
    "VARCHAR": (_to_str, "string", "string"),
    "TEXT": (_to_str, "string", "string"),
    "STRING": (_to_str, "string", "string"),
    "INTEGER": (_to_int, "integer", "int64"),
    "INT": (_to_int, "integer", "int64"),
    "BIGINT": (_to_int, "integer", "int64"),
    "DOUBLE": (float, "number", "float64"),
    "FLOAT": (float, "number", "float64"),
    "BOOLEAN": (_to_bool, "boolean", "bool"),
    "BOOL": (_to_bool, "boolean", "bool"),
    "DATE": (lambda v: _dt.date.fromisoformat(str(v)), "string", "date32"),
}


def parse_schema(text: str, /) -> tuple[SchemaField, ...]:
    """Parse ``'name TYPE, ...'`` into fields.

    Raises:
        PlanError: empty, malformed, duplicate names, or an unsupported type.
    """
    fields: list[SchemaField] = []
    for part in [p.strip() for p in text.split(",")]:
        bits = part.split()
        if len(bits) != 2 or not _NAME.match(bits[0]):
            raise PlanError(
                f"LLM_EXTRACT schema entry {part!r} is malformed; write 'name TYPE, ...', "
                "e.g. schema => 'title VARCHAR, year INTEGER'"
            )
        name, typ = bits[0], bits[1].upper()
        if typ not in TYPES:
            raise PlanError(
                f"LLM_EXTRACT schema field {name!r} has unsupported type {bits[1]!r}; "
                f"use one of {', '.join(sorted(TYPES))}"
            )
        if any(f.name == name for f in fields):
            raise PlanError(f"LLM_EXTRACT schema names field {name!r} twice")
        fields.append(SchemaField(name, typ))
    return tuple(fields)


def json_schema(fields: tuple[SchemaField, ...], /) -> str:
    """The JSON schema constraining the answer to an object with these fields."""
    props = {f.name: _property(f) for f in fields}
    # Properties keep the schema's order: constrained decoders generate them in that order.
    return json.dumps(
        {"type": "object", "properties": props, "required": [f.name for f in fields]}
    )


def _property(f: SchemaField) -> dict[str, str]:
    prop = {"type": TYPES[f.type][1]}
    if f.type == "DATE":
        prop["format"] = "date"
    return prop


def _json_object(text: str) -> dict[str, Any] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Validate the JSON answer against the schema and convert each field."""
    obj = _json_object(text)
    if obj is None:
        return Parsed(None, False, f"answer is not a JSON object: {text[:60]!r}")
    out: dict[str, Any] = {}
    for f in options.schema or ():
        raw = obj.get(f.name)
        try:
            out[f.name] = None if raw is None else TYPES[f.type][0](raw)
        except (ValueError, TypeError) as exc:
            return Parsed(None, False, f"field {f.name!r}: {exc}")
    return Parsed(out, True)
