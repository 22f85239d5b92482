"""One wording for validation errors on every endpoint.

Form fields and query parameters are checked by hand (``Must be one of a, b``, ``Must be between
1 and 4``); JSON bodies are decoded by msgspec, whose messages read differently (``Invalid enum
value '5:4'``, ``Expected `int` <= 4``). ``phrase`` rewrites msgspec's message for the field it
names, from the Struct's own declared constraints, so both say the same thing and list the
allowed values and ranges.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect as mi

from gateway.errors import split_validation_error

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
    "array": "a list", "object": "an object", "null": "null",
}


def _field_type(root: Any, path: str) -> mi.Type | None:
    """The declared type at ``path`` (``a.b[0].c``) inside the Struct type ``root``."""
    t: mi.Type | None = mi.type_info(root)
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        t = _unwrap(t)
        if part.startswith("["):
            t = t.item_type if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)) else None
        elif isinstance(t, mi.StructType):
            t = next((f.type for f in t.fields if f.encode_name == part), None)
        else:
            return None
        if t is None:
            return None
    return _unwrap(t)


def _unwrap(t: Any) -> Any:
    """``X | None`` as ``X``."""
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1:
            return rest[0]
    return t


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(t: Any) -> str | None:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    if lo is not None and hi is not None:
        return f"Must be between {_num(lo)} and {_num(hi)}" + ("" if t.ge is not None and t.le is not None else " (exclusive)")
    if lo is not None:
        return f"Must be {'at least' if t.ge is not None else 'more than'} {_num(lo)}"
    if hi is not None:
        return f"Must be {'at most' if t.le is not None else 'less than'} {_num(hi)}"
    return None


def phrase(root: Any, path: str, message: str) -> str:
    """msgspec's ``message`` about the field at ``path`` in the gateway's words."""
    t = _field_type(root, path) if path else None
    if isinstance(t, mi.LiteralType):
        return "Must be one of " + ", ".join(str(v) for v in t.values)
    if isinstance(t, mi.EnumType):
        return "Must be one of " + ", ".join(str(v.value) for v in t.cls)
    if isinstance(t, (mi.IntType, mi.FloatType)):
        if message.startswith("Expected `") and ("<" in message or ">" in message):
            return _range(t) or message
        kind = "an integer" if isinstance(t, mi.IntType) else "a number"
        r = _range(t)
        return f"Must be {kind} " + r[len("Must be "):] if r else f"Must be {kind}"
    if isinstance(t, mi.StrType):
        lo, hi = t.min_length, t.max_length
        if "length <=" in message and hi is not None:
            return f"Must be at most {hi} characters"
        if "length >=" in message and lo is not None:
            return "Must not be empty" if lo == 1 else f"Must be at least {lo} characters"
        return "Must be a string"
    if isinstance(t, mi.BoolType):
        return "Must be true or false"
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        if "length" in message:
            if t.min_length == 1 and "length >=" in message:
                return "Must not be empty"
            if t.max_length is not None:
                return f"Must have at most {t.max_length} items"
        return "Must be a list"
    if isinstance(t, mi.StructType):
        return "Must be an object"
    m = re.match(r"Expected `(\w+)`", message)
    if m and m.group(1) in _TYPE_WORDS:
        return f"Must be {_TYPE_WORDS[m.group(1)]}"
    return message


def decode_error_message(root: Any, err: msgspec.ValidationError) -> tuple[str, str]:
    """``(path, message)`` for a msgspec error decoding into ``root``; an unknown or missing
    field is named in the path (``Unknown field``, ``Required``)."""
    path, msg = split_validation_error(err)
    unknown = re.match(r"Object contains unknown field `([^`]+)`", msg)
    missing = re.match(r"Object missing required field `([^`]+)`", msg)
    if unknown or missing:
        name = (unknown or missing).group(1)  # type: ignore[union-attr]
        return (f"{path}.{name}" if path else name), ("Unknown field" if unknown else "Required")
    return path, phrase(root, path, msg)
