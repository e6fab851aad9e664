"""Training data: rows (read by qshard/rows.py) rendered as token sequences with a loss mask, and batched.

One file holds one row shape, detected from its first row (or named with data.format):

    alpaca  {"instruction": ..., "output": ..., "input"?: ..., "system"?: ...}
    chat    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
            or ShareGPT {"conversations": [{"from": "system" | "human" | "gpt" | ..., "value": ...}, ...]}
    text    {"text": ...}   (the key is data.text_field)

Reading (strict UTF-8 JSON, every problem named with file and row) is qshard/rows.py.

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

Only what can survive truncation to max_length is tokenized (see _encode_head), so the cost of a
row is bounded by max_length, not by its size.

Packed sequences (data.pack) keep their examples apart: position ids restart at 0 for each example,
from which transformers builds block-diagonal causal attention (see collate).

Batching is deterministic from (seed, epoch) alone, so every process of a distributed run builds
the same global batches without communicating.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch

from qshard.errors import QShardError
from qshard.rows import FORMATS, load_rows, shorten  # noqa: F401  (load_rows: callers read rows through data)

IGNORE = -100  # the label cross-entropy skips
TEMPLATES = ("auto", "tokenizer", "fallback")
FALLBACK_MARKERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
RENDER_LIMIT_S = 10.0  # one chat_template rendering; real templates take milliseconds
CLIP_SLACK = 64  # tokens tokenized past max_length: a cut changes only the last few tokens of a text

Render = Callable[[dict, str], tuple[list[int], list[int]]]


@dataclass
class Example:
    """One tokenized training sequence."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    starts: tuple[int, ...] = (0,)  # where each example joined into this sequence by pack() begins


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


# ---- tokenizing ----------------------------------------------------------------------------------

def tokenize_rows(rows: list[dict], fmt: str, tokenizer, max_length: int, template: str = "auto",
                  source: str = "") -> tuple[list[Example], DataReport]:
    """Render each row (from load_rows) to token ids and labels, truncate, and drop rows with no target."""
    if max_length < 1:
        raise QShardError(f"max_length must be at least 1, got {max_length}", where="data.max_length",
                          fix="set data.max_length to the longest sequence to train on, e.g. 2048")
    render = _renderer(fmt, tokenizer, template, max_length)
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


def _renderer(fmt: str, tokenizer, template: str, max_length: int) -> Render:
    """Pick how rows become (ids, labels) once, so the per-row loop holds no decisions."""
    if template not in TEMPLATES:
        raise QShardError(f"unknown chat template choice {template!r}", where="data.template",
                          fix=f"use one of {', '.join(TEMPLATES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "tokenizer" and not has_template:
        raise QShardError("data.template is 'tokenizer' but the tokenizer has no chat_template",
                          where="data.template", fix="set data.template: fallback (or auto) to use qshard's template")
    encode = partial(_encode_head, tokenizer=tokenizer, keep=max_length + CLIP_SLACK,
                     chars_per_token=max(map(len, tokenizer.get_vocab()), default=1))
    if fmt == "text":
        _require_eos(tokenizer, "end every text row")
        return lambda row, where: _text_ids(row["text"], encode, tokenizer.eos_token_id)
    if fmt not in ("alpaca", "chat"):
        raise QShardError(f"unknown data format {fmt!r}", where="data.format", fix=f"use one of {', '.join(FORMATS)}")
    if template == "fallback" or not has_template:
        _require_eos(tokenizer, "close assistant turns in the fallback chat template")
        chat = partial(_fallback_ids, encode=encode, eos=tokenizer.eos_token_id, max_length=max_length)
    else:
        chat = partial(_template_ids, tokenizer=tokenizer, encode=encode, max_length=max_length)
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


def _encode_head(text: str, tokenizer, keep: int, chars_per_token: int) -> list[int]:
    """The tokens of `text`, or of a prefix of it whose first keep - CLIP_SLACK (max_length) tokens
    are those of the whole text.

    A prefix of keep x (longest token, in characters) characters holds at least `keep` tokens, so
    only it is tokenized (doubled while a normalizer that drops characters leaves fewer than that).
    A cut changes only the tokens of the word it falls in, inside the CLIP_SLACK tokens past
    max_length (tests/test_hostile_data.py compares with whole texts, multi-byte ones included).
    One 60 MB row with max_length 64 once took 13 GB and 283 s to tokenize whole.
    """
    budget = keep * chars_per_token
    while budget < len(text):
        ids = _encode(tokenizer, text[:budget])
        if len(ids) > keep:
            return ids
        budget *= 2
    return _encode(tokenizer, text)


def _text_ids(text: str, encode, eos: int) -> tuple[list[int], list[int]]:
    ids = encode(text) + [eos]
    return ids, list(ids)


def _fallback_ids(messages: list[dict], where: str, encode, eos: int, max_length: int) -> tuple[list[int], list[int]]:
    """Render with FALLBACK_MARKERS. The prompt text between assistant turns is tokenized as one piece,
    exactly as it would be when prompting, and each assistant reply as another."""
    ids, labels, prompt = [], [], ""
    for message in messages:
        if len(ids) >= max_length:  # the rest lies past the cut (prompt is not empty: truncation is still counted)
            break
        prompt += FALLBACK_MARKERS[message["role"]]
        if message["role"] != "assistant":
            prompt += message["content"] + "\n"
            continue
        _extend(ids, labels, encode(prompt), loss=False)
        _extend(ids, labels, encode(message["content"]) + [eos], loss=True)
        prompt = "\n"
    _extend(ids, labels, encode(prompt), loss=False)
    return ids, labels


def _extend(ids: list[int], labels: list[int], new: list[int], loss: bool) -> None:
    ids.extend(new)
    labels.extend(new if loss else [IGNORE] * len(new))


def _template_ids(messages: list[dict], where: str, tokenizer, encode, max_length: int) -> tuple[list[int], list[int]]:
    """Find each assistant reply as the tokens between rendering the conversation up to it with a
    generation prompt and rendering it including the reply; only those tokens carry loss.

    This relies on the invariant that each of those renderings is a token prefix of the whole
    conversation (checked within max_length, the part that is trained). Templates that rewrite
    history (e.g. strip earlier reasoning) break it, and we refuse rather than guess.
    """
    if messages[0]["role"] == "assistant":  # an empty conversation cannot be rendered as the prefix
        raise QShardError("the conversation starts with an assistant message, which a chat_template cannot "
                          "locate", where=where, fix="start it with a user or system message, or set "
                          "data.template: fallback")
    full = encode(_render(tokenizer, messages, False, where))
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = encode(_render(tokenizer, messages[:i], True, where))
        if len(start) >= max_length:  # this reply and every later one lie past the cut
            break
        end = encode(_render(tokenizer, messages[:i + 1], False, where))
        n = min(len(end), max_length)
        if start != end[:len(start)] or end[:n] != full[:n]:
            raise QShardError(
                f"the chat_template of tokenizer {tokenizer.name_or_path!r} does not render a conversation's "
                f"beginning as a token prefix of the whole, so assistant message {i + 1} cannot be located",
                where=where, fix="set data.template: fallback to use qshard's template")
        # a reply longer than the slack was cut by encode: its closing eos lies past max_length
        clipped = len(end) > max_length + CLIP_SLACK
        stop = len(end) if clipped else _end_of_turn(end, len(start), tokenizer.eos_token_id)
        labels[len(start):stop] = full[len(start):stop]
    return full, labels


class _RenderTimeout(BaseException):
    """Raised into a chat_template rendering that ran out of time (BaseException: no `except
    Exception` inside jinja or transformers may swallow it)."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    name = f"the chat_template of tokenizer {tokenizer.name_or_path!r}"
    try:
        with _time_limit(RENDER_LIMIT_S):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except _RenderTimeout:
        raise QShardError(f"{name} did not finish rendering this conversation within {RENDER_LIMIT_S:g} s "
                          "(a loop that never ends?)", where=where,
                          fix="set data.template: fallback to use qshard's template, or fix the template") from None
    except Exception as e:  # noqa: BLE001 - a template is a program from the model folder: its errors are its own
        raise QShardError(f"{name} rejected this conversation: {type(e).__name__}: {shorten(str(e), 300)}",
                          where=where, fix="fix the row (e.g. alternate user/assistant turns) or set "
                                           "data.template: fallback") from None


@contextmanager
def _time_limit(seconds: float):
    """Raise _RenderTimeout into this block after `seconds` (of wall time), via SIGALRM.

    Signals reach only the main thread: called from another thread (an embedding application's
    worker), the block runs without a limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum, _frame):
        raise _RenderTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    which tokenize_rows never produces, would stand alone.) Each packed sequence records where its
    examples start, so collate can keep them from attending to each other.
    """
    packed, group, length = [], [], 0
    for example in examples:
        if group and length + len(example.input_ids) > max_length:
            packed.append(_join(group))
            group, length = [], 0
        group.append(example)
        length += len(example.input_ids)
    if group:
        packed.append(_join(group))
    return packed


def _join(group: list[Example]) -> Example:
    """One sequence of the group's examples. An example's first token is never a target: unpacked,
    nothing precedes it; packed, it would be predicted from the end of the previous example."""
    ids, labels, starts = [], [], []
    for example in group:
        starts.append(len(ids))
        ids += example.input_ids
        labels += [IGNORE, *example.labels[1:]]
    return Example(ids, labels, tuple(starts))


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
    """Right-pad to the longest example: pad_id in input_ids, IGNORE in labels, and either 0 in
    attention_mask or, when a sequence is packed, position ids that restart at each example.

    transformers (masking_utils.find_packed_sequence_indices, 5.17 and later) reads a restart of
    the position ids as the start of a new sequence and builds block-diagonal causal attention
    (eager, sdpa; flash attention uses the same ids) -- but only when no attention_mask is passed.
    Right padding needs no mask: causal attention never looks right, and padding has no labels.
    """
    longest = max(len(e.input_ids) for e in examples)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (longest - len(values))

    batch = {"input_ids": torch.tensor([padded(e.input_ids, pad_id) for e in examples], dtype=torch.long),
             "labels": torch.tensor([padded(e.labels, IGNORE) for e in examples], dtype=torch.long)}
    if any(len(e.starts) > 1 for e in examples):
        batch["position_ids"] = torch.tensor([_positions(e.starts, longest) for e in examples], dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor([padded([1] * len(e.input_ids), 0) for e in examples],
                                               dtype=torch.long)
    return batch


def _positions(starts: tuple[int, ...], length: int) -> list[int]:
    """0, 1, ... from each start; the padding continues the last example's count."""
    return [p for a, b in pairwise([*starts, length]) for p in range(b - a)]
