"""Training data: read rows, render them as token sequences with a loss mask, and batch them.

One file holds one row shape, detected from its first row (or named with data.format):

    alpaca  {"instruction": ..., "output": ..., "input"?: ..., "system"?: ...}
    chat    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
            or ShareGPT {"conversations": [{"from": "system" | "human" | "gpt" | ..., "value": ...}, ...]}
    text    {"text": ...}   (the key is data.text_field)

Loss is taken on assistant content and on the end marker that closes each assistant turn (so the
model learns to stop); every system, user and role-marker token is labelled -100. An alpaca row is
the chat [system?, user = instruction + "\\n\\n" + input, assistant = output]. Text rows train on
every token and end with eos.

Chats are rendered with the tokenizer's own chat_template when it has one, so the model trains on
exactly the text it will be prompted with at inference. Without one (or with data.template:
fallback) they are rendered with this FALLBACK template, {eos} being the tokenizer's eos token:

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}{eos}\\n

The markers are plain text: a tokenizer that lacks them as special tokens splits them into ordinary
tokens. To prompt a model trained this way, render the conversation and end with "<|assistant|>\\n".

Batching is deterministic from (seed, epoch) alone, so every process of a distributed run builds
the same global batches without communicating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from jinja2 import TemplateError

from qshard.errors import QShardError

IGNORE = -100  # the label cross-entropy skips
FORMATS = ("alpaca", "chat", "text")
TEMPLATES = ("auto", "tokenizer", "fallback")
SHAPES = {
    "alpaca": '{"instruction": ..., "output": ...} (optional "input", "system")',
    "chat": '{"messages": [{"role": ..., "content": ...}]} or {"conversations": [{"from": ..., "value": ...}]}',
    "text": '{"<data.text_field>": ...}',
}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "model": "assistant"}
FALLBACK_MARKERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}

Render = Callable[[dict, str], tuple[list[int], list[int]]]


@dataclass
class Example:
    """One tokenized training sequence."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


@dataclass
class DataReport:
    """What became of the dataset; printed to the user and written to the run folder.

    `examples` are the sequences kept; `truncated` counts kept ones that were cut to max_length;
    `dropped_no_target` counts sequences with no loss token left (they would train nothing).
    `tokens` / `loss_tokens` count the kept sequences.
    """

    path: str
    format: str
    rows: int
    examples: int
    truncated: int
    dropped_no_target: int
    tokens: int
    loss_tokens: int
    packed_sequences: int | None = None

    def summary(self) -> str:
        packed = f", packed into {self.packed_sequences:,} sequences" if self.packed_sequences is not None else ""
        return (f"{self.path} ({self.format}): {self.rows:,} rows -> {self.examples:,} examples "
                f"({self.truncated:,} truncated, {self.dropped_no_target:,} dropped with no target), "
                f"{self.tokens:,} tokens, {self.loss_tokens:,} with loss{packed}")


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
    records = _read_records(Path(path))
    if not records:
        raise QShardError("the dataset has no rows", where=str(path), fix="add rows or point data.path at another file")
    for record, where in records:
        if not isinstance(record, dict):
            raise QShardError(f"row is a JSON {type(record).__name__}, expected an object", where=where,
                              fix=_shapes_fix())
    if fmt == "auto":
        fmt = _detect(*records[0], text_field)
    normalise = {"alpaca": _alpaca_row, "chat": _chat_row, "text": partial(_text_row, field=text_field)}[fmt]
    return [normalise(record, where) for record, where in records], fmt


def _read_records(path: Path) -> list[tuple[object, str]]:
    """Parse the file into (record, where) pairs; `where` is what an error about the record points at."""
    if not path.is_file():
        raise QShardError(f"data file not found: {path}", where=str(path),
                          fix="check data.path (a relative path is resolved from the working directory)")
    if path.suffix not in (".json", ".jsonl"):
        raise QShardError(f"unsupported data file type {path.suffix!r}", where=str(path),
                          fix="use .jsonl (one object per line) or .json (a list of objects)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QShardError(f"file is not UTF-8 text: {e.reason} at byte {e.start}", where=str(path),
                          fix="re-save the file as UTF-8") from None
    return _read_jsonl(text, path) if path.suffix == ".jsonl" else _read_json(text, path)


def _read_jsonl(text: str, path: Path) -> list[tuple[object, str]]:
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may legally sit inside a JSON string.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            records.append((json.loads(line), where))
        except json.JSONDecodeError as e:
            raise QShardError(f"invalid JSON: {e.msg} (column {e.colno})", where=where,
                              fix="write exactly one JSON object per line") from None
    return records


def _read_json(text: str, path: Path) -> list[tuple[object, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QShardError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path} line {e.lineno}",
                          fix="a .json file holds one list of objects; name a file of one object per line .jsonl") from None
    if not isinstance(data, list):
        raise QShardError(f"expected a JSON list of rows, found a {type(data).__name__}", where=str(path),
                          fix="wrap the rows in [...] or write them one per line to a .jsonl file")
    return [(row, f"{path} row {i}") for i, row in enumerate(data, 1)]


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
    raise QShardError(f"cannot tell the data format from the keys {sorted(row)}", where=where, fix=_shapes_fix())


def _require(row: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise QShardError(f"row is missing {', '.join(map(repr, missing))} for the {fmt} format", where=where,
                          fix=f"{fmt} rows look like {SHAPES[fmt]}")
    for key in keys:
        _require_string(row[key], repr(key), where)


def _require_string(value: object, name: str, where: str) -> None:
    if not isinstance(value, str):
        raise QShardError(f"{name} must be a string, found {type(value).__name__}", where=where)


def _alpaca_row(row: dict, where: str) -> dict:
    _require(row, ("instruction", "output"), where, "alpaca")
    optional = {key: row.get(key) or "" for key in ("input", "system")}  # null is as good as absent
    for key, value in optional.items():
        _require_string(value, repr(key), where)
    return {"instruction": row["instruction"], "output": row["output"], **optional}


def _text_row(row: dict, where: str, field: str) -> dict:
    if field not in row:
        raise QShardError(f"row is missing {field!r} for the text format", where=where,
                          fix=f"text rows look like {{{field!r}: ...}}; set data.text_field if the key differs")
    _require_string(row[field], repr(field), where)
    return {"text": row[field]}


def _chat_row(row: dict, where: str) -> dict:
    """Normalise role/content and ShareGPT from/value turns to role/content with system/user/assistant."""
    if "messages" in row:
        turns, keys, roles = row["messages"], ("role", "content"), CHAT_ROLES
    elif "conversations" in row:
        turns, keys, roles = row["conversations"], ("from", "value"), SHAREGPT_ROLES
    else:
        raise QShardError("row is missing 'messages' (or 'conversations') for the chat format", where=where,
                          fix=f"chat rows look like {SHAPES['chat']}")
    if not isinstance(turns, list) or not turns:
        raise QShardError("the conversation must be a non-empty list of messages", where=where)
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
        raise QShardError(f"message {j} has unknown role {turn[role_key]!r}", where=where,
                          fix=f"use one of {', '.join(roles)}")
    _require_string(turn[text_key], f"message {j} {text_key!r}", where)
    return {"role": role, "content": turn[text_key]}


# ---- tokenizing ----------------------------------------------------------------------------------

def tokenize_rows(rows: list[dict], fmt: str, tokenizer, max_length: int, template: str = "auto",
                  source: str = "") -> tuple[list[Example], DataReport]:
    """Render each row (from load_rows) to token ids and labels, truncate, and drop rows with no target."""
    if max_length < 1:
        raise QShardError(f"max_length must be at least 1, got {max_length}", where="data.max_length",
                          fix="set data.max_length to the longest sequence to train on, e.g. 2048")
    render = _renderer(fmt, tokenizer, template)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows, 1):
        ids, labels = _with_bos(*render(row, f"{source or 'data'} row {i}"), tokenizer.bos_token_id)
        cut = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]  # keep the start: it holds the prompt
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        truncated += cut
        examples.append(Example(ids, labels))
    if not examples:
        raise QShardError(f"none of the {len(rows)} rows has a token to learn from within {max_length} tokens",
                          where=f"{source} / data.max_length",
                          fix="raise data.max_length (the prompts fill it before any assistant token)")
    report = DataReport(path=source, format=fmt, rows=len(rows), examples=len(examples), truncated=truncated,
                        dropped_no_target=dropped, tokens=sum(len(e.input_ids) for e in examples),
                        loss_tokens=sum(label != IGNORE for e in examples for label in e.labels))
    return examples, report


def _renderer(fmt: str, tokenizer, template: str) -> Render:
    """Pick how rows become (ids, labels) once, so the per-row loop holds no decisions."""
    if template not in TEMPLATES:
        raise QShardError(f"unknown chat template choice {template!r}", where="data.template",
                          fix=f"use one of {', '.join(TEMPLATES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "tokenizer" and not has_template:
        raise QShardError("data.template is 'tokenizer' but the tokenizer has no chat_template",
                          where="data.template", fix="set data.template: fallback (or auto) to use qshard's template")
    if fmt == "text":
        _require_eos(tokenizer, "end every text row")
        return partial(_text_ids, tokenizer=tokenizer)
    if fmt not in ("alpaca", "chat"):
        raise QShardError(f"unknown data format {fmt!r}", where="data.format", fix=f"use one of {', '.join(FORMATS)}")
    if template == "fallback" or not has_template:
        _require_eos(tokenizer, "close assistant turns in the fallback chat template")
        chat = partial(_fallback_ids, tokenizer=tokenizer)
    else:
        chat = partial(_template_ids, tokenizer=tokenizer)
    if fmt == "alpaca":
        return lambda row, where: chat(_alpaca_messages(row), where=where)
    return lambda row, where: chat(row["messages"], where=where)


def _require_eos(tokenizer, purpose: str) -> None:
    if tokenizer.eos_token_id is None:
        raise QShardError(f"the tokenizer has no eos token, needed to {purpose}", where="tokenizer",
                          fix="set eos_token in the model's tokenizer_config.json")


def _alpaca_messages(row: dict) -> list[dict]:
    user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    system = [{"role": "system", "content": row["system"]}] if row["system"] else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_ids(row: dict, where: str, tokenizer) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, row["text"]) + [tokenizer.eos_token_id]
    return ids, list(ids)


def _fallback_ids(messages: list[dict], where: str, tokenizer) -> tuple[list[int], list[int]]:
    """Render with FALLBACK_MARKERS. The prompt text between assistant turns is tokenized as one piece,
    exactly as it would be when prompting, and each assistant reply as another."""
    ids, labels, prompt = [], [], ""
    for message in messages:
        prompt += FALLBACK_MARKERS[message["role"]]
        if message["role"] != "assistant":
            prompt += message["content"] + "\n"
            continue
        _extend(ids, labels, _encode(tokenizer, prompt), loss=False)
        _extend(ids, labels, _encode(tokenizer, message["content"]) + [tokenizer.eos_token_id], loss=True)
        prompt = "\n"
    _extend(ids, labels, _encode(tokenizer, prompt), loss=False)
    return ids, labels


def _extend(ids: list[int], labels: list[int], new: list[int], loss: bool) -> None:
    ids.extend(new)
    labels.extend(new if loss else [IGNORE] * len(new))


def _template_ids(messages: list[dict], where: str, tokenizer) -> tuple[list[int], list[int]]:
    """Find each assistant reply as the tokens between rendering the conversation up to it with a
    generation prompt and rendering it including the reply; only those tokens carry loss.

    This relies on the invariant that each of those renderings is a token prefix of the whole
    conversation. Templates that rewrite history (e.g. strip earlier reasoning) break it, and we
    refuse rather than guess.
    """
    if messages[0]["role"] == "assistant":  # an empty conversation cannot be rendered as the prefix
        raise QShardError("the conversation starts with an assistant message, which a chat_template cannot "
                          "locate", where=where, fix="start it with a user or system message, or set "
                          "data.template: fallback")
    full = _render(tokenizer, messages, False, where)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True, where)
        end = _render(tokenizer, messages[:i + 1], False, where)
        if start != end[:len(start)] or end != full[:len(end)]:
            raise QShardError(
                f"the chat_template of tokenizer {tokenizer.name_or_path!r} does not render a conversation's "
                f"beginning as a token prefix of the whole, so assistant message {i + 1} cannot be located",
                where=where, fix="set data.template: fallback to use qshard's template")
        stop = _end_of_turn(end, len(start), tokenizer.eos_token_id)
        labels[len(start):stop] = full[len(start):stop]
    return full, labels


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise QShardError(f"the tokenizer's chat_template rejected this conversation: {e}", where=where,
                          fix="fix the row (e.g. alternate user/assistant turns) or set data.template: fallback") from None
    return _encode(tokenizer, text)


def _end_of_turn(ids: list[int], start: int, eos: int | None) -> int:
    """Loss stops after the last eos in the reply: what a template writes after it (a newline) is
    formatting the model never has to generate."""
    if eos is None or eos not in ids[start:]:
        return len(ids)
    return len(ids) - ids[::-1].index(eos)


def _with_bos(ids: list[int], labels: list[int], bos: int | None) -> tuple[list[int], list[int]]:
    """Prepend BOS unless the rendering already has it. Nothing precedes BOS, so it is never a target."""
    if bos is None or ids[:1] == [bos]:
        return ids, labels
    return [bos, *ids], [IGNORE, *labels]


# ---- batching ------------------------------------------------------------------------------------

def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate whole examples, in order, into sequences of at most max_length tokens.

    Examples are never split, so no reply loses its prompt. (An example longer than max_length,
    which tokenize_rows never produces, would stand alone.)
    """
    packed, ids, labels = [], [], []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_length:
            packed.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + example.input_ids, labels + example.labels
    if ids:
        packed.append(Example(ids, labels))
    return packed


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one) for evaluation; both sides keep the file order."""
    if not 0 <= fraction < 1:
        raise QShardError(f"eval fraction must be in [0, 1), got {fraction}", where="data.eval_fraction")
    if fraction == 0:
        return list(examples), []
    n = len(examples)
    n_eval = max(1, round(fraction * n))
    if n - n_eval < 1:
        raise QShardError(f"holding out {n_eval} of {n} examples for evaluation leaves none to train on",
                          where="data.eval_fraction", fix="lower data.eval_fraction or add data")
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch; a function of (seed, epoch) only, so identical on every rank."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's order in groups of global_batch indices. The incomplete tail is dropped so every
    world size sees the same global batches (and so the same optimizer steps)."""
    if n < global_batch:
        raise QShardError(
            f"{n} training sequences cannot fill one global batch of {global_batch} "
            "(micro batch x gradient accumulation x processes)",
            where="train.micro_batch_size / train.gradient_accumulation_steps",
            fix="lower train.micro_batch_size or train.gradient_accumulation_steps, or add data")
    order = epoch_order(n, seed, epoch)
    return [order[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


def pad_token_id(tokenizer) -> int:
    """The id to pad with. Padding is masked out (attention 0, label -100), so eos stands in when a
    tokenizer has no pad token, and 0 when it has neither."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad_id in input_ids, 0 in attention_mask, IGNORE in labels."""
    longest = max(len(e.input_ids) for e in examples)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (longest - len(values))

    return {
        "input_ids": torch.tensor([padded(e.input_ids, pad_id) for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([padded([1] * len(e.input_ids), 0) for e in examples], dtype=torch.long),
        "labels": torch.tensor([padded(e.labels, IGNORE) for e in examples], dtype=torch.long),
    }
