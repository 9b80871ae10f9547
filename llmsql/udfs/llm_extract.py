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
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmsql.errors import PlanError
from llmsql.udfs.base import (
    Abilities,
    CallOptions,
    Constraints,
    OptionRule,
    Parsed,
    SchemaField,
    UDFSpec,
)

if TYPE_CHECKING:
    from collections.abc import Callable

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
    msg = f"not a boolean: {v!r}"
    raise ValueError(msg)


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        msg = "boolean is not an integer"
        raise ValueError(msg)
    if isinstance(v, float) and not v.is_integer():
        msg = f"not an integer: {v!r}"
        raise ValueError(msg)
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
            msg = (
                f"LLM_EXTRACT schema entry {part!r} is malformed; write 'name TYPE, ...', "
                "e.g. schema => 'title VARCHAR, year INTEGER'"
            )
            raise PlanError(msg)
        name, typ = bits[0], bits[1].upper()
        if typ not in TYPES:
            msg = (
                f"LLM_EXTRACT schema field {name!r} has unsupported type {bits[1]!r}; "
                f"use one of {', '.join(sorted(TYPES))}"
            )
            raise PlanError(msg)
        if any(f.name == name for f in fields):
            msg = f"LLM_EXTRACT schema names field {name!r} twice"
            raise PlanError(msg)
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


def check_schema(value: object, /) -> tuple[SchemaField, ...]:
    """The ``schema =>`` option: ``'name TYPE, ...'`` parsed (:func:`parse_schema`)."""
    if not isinstance(value, str) or not value.strip():
        msg = "needs schema => 'name TYPE, ...', e.g. schema => 'title VARCHAR, year INTEGER'"
        raise ValueError(
            msg)
    try:
        return parse_schema(value)
    except PlanError as exc:
        raise ValueError(str(exc)) from None


def constraints(options: CallOptions, abilities: Abilities, /) -> Constraints:
    """JSON matching the schema, where the backend can constrain the answer."""
    if abilities.json_schema and options.schema:
        return Constraints(json_schema=json_schema(options.schema))
    return Constraints()


def arrow_type(options: CallOptions, /) -> pa.DataType:
    """A struct of the schema's fields."""
    return pa.struct([(f.name, pa.type_for_alias(TYPES[f.type][2]))
                      for f in options.schema or ()])


SPEC = UDFSpec("LLM_EXTRACT", "EXTRACT", "STRUCT", DEFAULT_MAX_TOKENS, parse,
               arrow_type=arrow_type, constraints=constraints,
               options=(OptionRule("schema", check_schema),))
