"""Reading training rows: .jsonl (a line at a time) or .json (a list), one row shape per file.

A file is strict UTF-8 JSON without a byte-order mark: NaN/Infinity and duplicate keys are refused,
and every problem names the file and row (a .jsonl line, or the row of a .json list) before the
model is touched. A .jsonl file is read a line at a time (memory holds the rows, not the text as
well); a .json file is read whole, so large data belongs in .jsonl. The shapes are listed in
qshard/data.py, which turns rows into token sequences.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from qshard.errors import QShardError

FORMATS = ("alpaca", "chat", "text")
SHAPES = {
    "alpaca": '{"instruction": ..., "output": ...} (optional "input", "system")',
    "chat": '{"messages": [{"role": ..., "content": ...}]} or {"conversations": [{"from": ..., "value": ...}]}',
    "text": '{"<data.text_field>": ...}',
}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "model": "assistant"}


# ---- reading -------------------------------------------------------------------------------------

def load_rows(path: str | Path, fmt: str = "auto", text_field: str = "text") -> tuple[list[dict], str]:
    """Read and check every row, returning normalised rows and the resolved format.

    Rows come back as {"instruction", "input", "output", "system"} (alpaca), {"messages": [{"role",
    "content"}]} (chat, ShareGPT included) or {"text"} (text), so later stages see one shape per
    format. Checking everything here is what lets errors name the file line.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise QShardError(f"unknown data format {fmt!r}", where="data.format",
                          fix=f"use one of auto, {', '.join(FORMATS)}")
    rows, normalise = [], None
    for record, where in _read_records(Path(path)):
        if not isinstance(record, dict):
            fix = "a .jsonl file holds one object per line, not a list of them" if isinstance(record, list) else ""
            raise QShardError(f"row is a JSON {_json_type(record)}, expected an object", where=where,
                              fix=f"{fix}; {_shapes_fix()}" if fix else _shapes_fix())
        if normalise is None:
            fmt = _detect(record, where, text_field) if fmt == "auto" else fmt
            normalise = {"alpaca": _alpaca_row, "chat": _chat_row, "text": partial(_text_row, field=text_field)}[fmt]
        rows.append(normalise(record, where))  # one row at a time: the parsed record is dropped at once
    if not rows:
        raise QShardError("the dataset has no rows", where=str(path), fix="add rows or point data.path at another file")
    return rows, fmt


def _read_records(path: Path) -> Iterator[tuple[object, str]]:
    """Parse the file into (record, where) pairs; `where` is what an error about the record points at."""
    if not path.exists():
        raise QShardError(f"data file not found: {path}", where=str(path),
                          fix="check data.path (a relative path is resolved from the working directory)")
    if path.is_dir():
        raise QShardError(f"{path} is a folder, not a data file", where=str(path),
                          fix="point data.path at the .jsonl or .json file itself")
    if not path.is_file():
        raise QShardError(f"{path} is not a regular file", where=str(path), fix="copy the data into a .jsonl file")
    if path.suffix.lower() not in (".json", ".jsonl"):
        kind = f"type {path.suffix!r}" if path.suffix else "without an extension"
        raise QShardError(f"unsupported data file {kind}", where=str(path),
                          fix="use .jsonl (one object per line) or .json (a list of objects)")
    return _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_json(path)


def _read_jsonl(path: Path) -> Iterator[tuple[object, str]]:
    with _open(path) as lines:
        # bytes split on b"\n" only: U+2028 and friends may legally sit inside a JSON string
        for lineno, raw in enumerate(lines, 1):
            where = f"{path} line {lineno}"
            line = _utf8(raw.rstrip(b"\r\n"), path, lineno)
            if line and not line.isspace():
                with _json_errors(where, "write exactly one JSON object per line"):
                    record = _DECODER.decode(line)
                yield record, where


def _read_json(path: Path) -> Iterator[tuple[object, str]]:
    """A list of rows, decoded one row at a time so that an error names its row."""
    with _open(path) as f:
        text = _utf8(f.read(), path, 1)
    fix = "a .json file holds one list of objects; name a file of one object per line .jsonl"
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        with _json_errors(str(path), fix):
            top = _DECODER.decode(text)
        raise QShardError(f"expected a JSON list of rows, found {_a(top)}", where=str(path),
                          fix="wrap the rows in [...] or write them one per line to a .jsonl file")
    rows, pos = 0, _skip_space(text, pos + 1)
    closed = text.startswith("]", pos)
    if closed:
        pos = _skip_space(text, pos + 1)
    while not closed:
        rows += 1
        where = f"{path} row {rows}"
        with _json_errors(where, fix):
            row, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_space(text, pos)
            closed = text.startswith("]", pos)
            if not closed and not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter or ']' after the row", text, pos)
            pos = _skip_space(text, pos + 1)
        yield row, where
    if pos < len(text):
        with _json_errors(str(path), fix):
            raise json.JSONDecodeError("Extra data after the list of rows", text, pos)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise QShardError(f"cannot read {path}: {e.strerror}", where=str(path),
                          fix="check the file's permissions") from None


def _utf8(raw: bytes, path: Path, first_line: int) -> str:
    """Strict UTF-8 text of the bytes that begin at line `first_line` of the file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise QShardError(f"not UTF-8 text: {e.reason} at byte {column} of the line", where=f"{path} line {line}",
                          fix="re-save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        raise QShardError("the line starts with a byte-order mark (BOM, U+FEFF)", where=f"{path} line {first_line}",
                          fix="save the file as UTF-8 without a BOM ('UTF-8', not 'UTF-8 with BOM')")
    return text


class _NotData(ValueError):
    """JSON that Python's parser accepts but a data file must not hold."""


def _no_constant(name: str):
    raise _NotData(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    row = dict(pairs)
    if len(row) < len(pairs):
        key = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _NotData(f"duplicate key {shorten(key)} in one object (JSON readers would keep only the last)")
    return row


_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_unique_keys)
_SPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


@contextmanager
def _json_errors(where: str, fix: str):
    """Turn what the JSON parser raises into a QShardError at `where`."""
    try:
        yield
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise QShardError(f"invalid JSON: {e.msg} ({at})", where=where, fix=fix) from None
    except _NotData as e:
        raise QShardError(str(e), where=where,
                          fix="write standard JSON (null for a missing number, one value per key)") from None
    except RecursionError:
        raise QShardError("JSON nested too deeply to read", where=where,
                          fix="rows are objects of strings and lists of messages; flatten this one") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise QShardError(f"unreadable JSON value: {str(e).split(':')[0]}", where=where, fix=fix) from None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _a(value: object) -> str:
    """'an object', 'a list', 'null': the JSON type of a value, for "found ..." in messages."""
    name = _json_type(value)
    return name if name == "null" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def shorten(value: object, limit: int = 60) -> str:
    """repr of a value from the data, cut so that a huge one cannot flood the error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _shapes_fix() -> str:
    return "each row must be an object shaped like one of: " + "; ".join(f"{k}: {v}" for k, v in SHAPES.items())


def _detect(row: dict, where: str, text_field: str) -> str:
    """The format of the first row decides the file's; every later row is checked against it."""
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "messages" in row or "conversations" in row:
        return "chat"
    if text_field in row:
        return "text"
    keys = ", ".join(shorten(k, 30) for k in sorted(row)[:8]) + (", ..." if len(row) > 8 else "")
    raise QShardError(f"cannot tell the data format from the keys [{keys}]", where=where, fix=_shapes_fix())


def _require(row: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise QShardError(f"row is missing {', '.join(map(repr, missing))} for the {fmt} format", where=where,
                          fix=f"{fmt} rows look like {SHAPES[fmt]}")
    for key in keys:
        _check_text(row[key], repr(key), where)


def _check_text(value: object, name: str, where: str, empty_ok: bool = False) -> str:
    """A string a tokenizer can encode: not another JSON type, not empty (unless allowed), no lone surrogate."""
    if not isinstance(value, str):
        raise QShardError(f"{name} must be a string, found {_a(value)}", where=where,
                          fix="write the text as a JSON string")
    if not empty_ok and (not value or value.isspace()):
        raise QShardError(f"{name} is empty", where=where, fix="fill it in or remove the row")
    if _SURROGATE.search(value):
        raise QShardError(f"{name} holds an unpaired surrogate escape (\\ud800-\\udfff), which is not text",
                          where=where, fix="re-export the data: a character was split in half (often an emoji)")
    return value


def _alpaca_row(row: dict, where: str) -> dict:
    _require(row, ("instruction", "output"), where, "alpaca")
    optional = {key: "" if row.get(key) is None else row[key] for key in ("input", "system")}  # null = absent
    for key, value in optional.items():
        _check_text(value, repr(key), where, empty_ok=True)
    return {"instruction": row["instruction"], "output": row["output"], **optional}


def _text_row(row: dict, where: str, field: str) -> dict:
    if field not in row:
        raise QShardError(f"row is missing {field!r} for the text format", where=where,
                          fix=f"text rows look like {{{field!r}: ...}}; set data.text_field if the key differs")
    return {"text": _check_text(row[field], repr(field), where)}


def _chat_row(row: dict, where: str) -> dict:
    """Normalise role/content and ShareGPT from/value turns to role/content with system/user/assistant."""
    if "messages" in row:
        key, keys, roles = "messages", ("role", "content"), CHAT_ROLES
    elif "conversations" in row:
        key, keys, roles = "conversations", ("from", "value"), SHAREGPT_ROLES
    else:
        raise QShardError("row is missing 'messages' (or 'conversations') for the chat format", where=where,
                          fix=f"chat rows look like {SHAPES['chat']}")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        found = "an empty list" if isinstance(turns, list) else _a(turns)
        raise QShardError(f"{key!r} must be a non-empty list of messages, found {found}", where=where,
                          fix=f"chat rows look like {SHAPES['chat']}")
    messages = [_message(turn, j, keys, roles, where) for j, turn in enumerate(turns, 1)]
    if not any(m["role"] == "assistant" for m in messages):
        raise QShardError("the conversation has no assistant turn, so there is nothing to learn from", where=where,
                          fix="add an assistant message or remove the row")
    return {"messages": messages}


def _message(turn: object, j: int, keys: tuple[str, str], roles: dict, where: str) -> dict:
    role_key, text_key = keys
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise QShardError(f"message {j} must be an object with {role_key!r} and {text_key!r}", where=where)
    role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
        raise QShardError(f"message {j} has unknown role {shorten(turn[role_key])}", where=where,
                          fix=f"use one of {', '.join(roles)}")
    content = _check_text(turn[text_key], f"message {j} {text_key!r}", where, empty_ok=role == "system")
    return {"role": role, "content": content}


