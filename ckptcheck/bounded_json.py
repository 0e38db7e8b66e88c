"""The one JSON loader for every input JSON (params.json, config.json, safetensors headers, index files).

Python's ``json`` recurses once per nesting level (a file nested ~1,000 deep raises ``RecursionError``),
turns any run of digits into an int (an integer over 4,300 digits raises inside the error path, and smaller
huge ones make every later size computation slow), and keeps the last of duplicate keys silently.  Here the
nesting depth is measured on the text before parsing, integers are refused by their digit count before
conversion, duplicate keys are refused, and every refusal is one ``InputError(path, item, cause)``.

NaN, Infinity and -Infinity are accepted and returned as floats, as Python's own ``json`` (and so
transformers and the training code) reads them, and so is a float literal too large to be finite ("1e400" is
inf in every JSON reader that uses doubles).  Whoever reads a number therefore checks it is finite where it
matters; the config readers do, naming the field.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from .errors import InputError

# Real configs and headers nest fewer than 10 levels.
MAX_DEPTH = 64
# No dimension, offset or count in a checkpoint needs more digits (2**128 has 39).
MAX_INT_DIGITS = 40
# Longest text of an input value quoted in a message (a wrong value can be a whole nested document).
QUOTE_CHARS = 60

# A JSON string literal, or an unterminated one running to the end of the text (so that no later quote is
# tried as another start: text of 8 MB of escaped quotes took hours with rescans), and what is left once
# strings are gone.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_STRUCTURE = re.compile(r"[^\[\]{},]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1, ",": 0}
# An escape of a UTF-16 surrogate: paired, Python's json joins it into one character; alone it is no Unicode
# text, which the safetensors library's (serde) JSON reader refuses, so it is refused here as well.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    """Raised inside the parser's hooks; becomes the InputError once the parser has unwound."""


def loads(data: bytes | str, path: str | Path, item: str | None = None, *, max_values: int | None = None) -> Any:
    """``data`` parsed as JSON, or ``InputError(path, item, cause)`` for text that is not UTF-8, not JSON,
    nested deeper than ``MAX_DEPTH``, holding an integer over ``MAX_INT_DIGITS`` digits or a duplicate key, or
    more than ``max_values`` values (each costs far more memory parsed than its 2 or 3 bytes of text).
    ``item`` names what the JSON is inside ``path`` (e.g. "header"), or None when it is the whole file."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(path, item, f"not UTF-8 text (byte {exc.start})") from None
    else:
        text = data
    skeleton = _skeleton(text)
    depth = max(accumulate(map(_DELTA.__getitem__, skeleton)), default=0)
    if depth > MAX_DEPTH:
        raise InputError(path, item, f"JSON nested {depth} levels deep (limit {MAX_DEPTH})")
    # Each element or member after a container's first follows a comma; counting the containers opened too
    # bounds both (one element each at most), measured before parsing.
    values = len(skeleton) - skeleton.count("]") - skeleton.count("}") + 1
    if max_values is not None and values > max_values:
        raise InputError(path, item, f"{values} JSON values and containers (limit {max_values})")
    try:
        parsed = json.loads(text, object_pairs_hook=reject_duplicate_keys, parse_int=_parse_int)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        return parsed
    except UnicodeEncodeError as exc:
        raise InputError(path, item, f"invalid JSON: a lone surrogate escape (\\u{ord(exc.object[exc.start]):04x}) "
                                     "is no Unicode text") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InputError(path, f"{item}, {where}" if item else where, f"invalid JSON: {exc.msg}") from None
    except _Refused as exc:
        raise InputError(path, item, str(exc)) from None


def _skeleton(text: str) -> str:
    """The brackets and commas of ``text``, those inside strings left out: its nesting and its number of values
    are measured on it in linear time and without recursion, before parsing."""
    return _NOT_STRUCTURE.sub("", _STRING.sub("", text))


def _parse_int(digits: str) -> int:
    count = len(digits) - digits.startswith("-")
    if count > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {count} digits (limit {MAX_INT_DIGITS})")
    return int(digits)


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: JSON parsers keep the last of duplicate keys silently; refuse them."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"duplicate key {shown(k)}")
        out[k] = v
    return out


def shown(value: Any) -> str:
    """An input value for a message: its repr, cut to ``QUOTE_CHARS``; the one place values are quoted."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."
