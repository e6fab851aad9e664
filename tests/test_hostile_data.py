"""Hostile data: every malformed file, row, field or chat template stops `qshard train` with exit 2
and a message naming the file and row (or field), before the model is loaded and before anything
is written; rows of any size cost what max_length allows, not what the row holds."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
import tracemalloc

import pytest
import yaml
from transformers import AutoTokenizer

from qshard import data
from qshard.errors import QShardError
from tests.helpers import ROWS, recipe_dict
from tests.hostile import assert_refused, changed, run_cli, snapshot

GOOD = json.dumps(ROWS[0])
ALPACA = "".join(json.dumps(r) + "\n" for r in ROWS)
CHAT = [{"role": "user", "content": "What is ice?"}, {"role": "assistant", "content": "Frozen water."}]
CHATS = "".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8))


def jsonl(*rows) -> str:
    """GOOD rows around the hostile one(s): a JSON-dumped dict, or a raw line when a string."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def alpaca(**fields) -> dict:
    return {"instruction": "Name a fruit.", "output": "An apple.", **fields}


def chat(*messages) -> dict:
    return {"messages": list(messages)}


DEEP = "[" * 100_000 + "]" * 100_000

# id -> (file name, content (str, bytes, "DIR" or None for no file), location named with the file, fragments)
CASES = {
    # -- the file itself
    "not-utf8": ("d.jsonl", (GOOD + '\n{"instruction": "caf').encode() + b"\xe9\"}\n", "line 2", ["not UTF-8"]),
    "utf16": ("d.jsonl", ALPACA.encode("utf-16"), "line 1", ["not UTF-8"]),
    "bom-jsonl": ("d.jsonl", b"\xef\xbb\xbf" + ALPACA.encode(), "line 1", ["byte-order mark (BOM"]),
    "bom-json": ("d.json", b"\xef\xbb\xbf" + json.dumps(ROWS).encode(), "line 1", ["byte-order mark (BOM"]),
    "empty-file": ("d.jsonl", "", "", ["no rows"]),
    "blank-lines-only": ("d.jsonl", "\n  \n\t\r\n", "", ["no rows"]),
    "empty-json-list": ("d.json", " [ ] ", "", ["no rows"]),
    "json-top-object": ("d.json", GOOD, "", ["expected a JSON list", "found an object"]),
    "json-top-string": ("d.json", '"rows"', "", ["found a string"]),
    "json-top-null": ("d.json", "null", "", ["found null"]),
    "json-bad-row": ("d.json", '[\n{"text": "a"},\n{"text": }\n]', "row 2", ["invalid JSON", "line 3"]),
    "json-unclosed": ("d.json", '[{"text": "a"}', "row 1", ["invalid JSON", "']'"]),
    "json-trailing-comma": ("d.json", '[{"text": "a"},]', "row 2", ["invalid JSON"]),
    "json-extra-data": ("d.json", '[{"text": "a"}] [', "", ["invalid JSON", "extra data"]),
    "jsonl-bad-line": ("d.jsonl", jsonl(GOOD, GOOD, '{"instruction": '), "line 3", ["invalid JSON"]),
    "jsonl-row-list": ("d.jsonl", jsonl(GOOD, "[1, 2]"), "line 2", ["row is a JSON list"]),
    "jsonl-row-string": ("d.jsonl", jsonl('"just text"'), "line 1", ["row is a JSON string"]),
    "jsonl-row-number": ("d.jsonl", jsonl(GOOD, "42"), "line 2", ["row is a JSON number"]),
    "jsonl-row-null": ("d.jsonl", jsonl(GOOD, "null"), "line 2", ["row is a JSON null"]),
    "jsonl-holds-a-list": ("d.jsonl", json.dumps(ROWS), "line 1", ["one object per line"]),
    "deep-nesting-jsonl": ("d.jsonl", jsonl(GOOD, GOOD[:-1] + ', "x": ' + DEEP + "}"), "line 2", ["nested too deeply"]),
    "deep-nesting-json": ("d.json", f"[{GOOD}, {DEEP}]", "row 2", ["nested too deeply"]),
    "nan": ("d.jsonl", jsonl(GOOD, GOOD[:-1] + ', "score": NaN}'), "line 2", ["NaN is not valid JSON"]),
    "infinity": ("d.jsonl", jsonl(GOOD[:-1] + ', "score": Infinity}'), "line 1", ["Infinity"]),
    "minus-infinity-in-json": ("d.json", f'[{GOOD}, {{"text": -Infinity}}]', "row 2", ["-Infinity"]),
    "duplicate-key": ("d.jsonl", jsonl(GOOD, '{"instruction": "a", "output": "b", "output": "c"}'), "line 2",
                      ["duplicate key 'output'"]),
    "duplicate-key-in-message": ("d.json", '[{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}]',
                                 "row 1", ["duplicate key 'role'"]),
    "huge-integer": ("d.jsonl", jsonl(GOOD[:-1] + ', "n": ' + "7" * 5000 + "}"), "line 1",
                     ["unreadable JSON value: Exceeds the limit (4300 digits)"]),
    "folder": ("d.jsonl", "DIR", "", ["is a folder"]),
    "missing": ("d.jsonl", None, "", ["not found"]),
    "txt": ("d.txt", ALPACA, "", ["unsupported data file type '.txt'"]),
    "csv": ("d.csv", "instruction,output\na,b\n", "", ["unsupported data file type '.csv'"]),
    "no-extension": ("data", ALPACA, "", ["unsupported data file without an extension"]),
    "long-garbage-line": ("d.jsonl", "x" * 3_000_000, "line 1", ["invalid JSON"]),
    "long-line-wrong-type": ("d.jsonl", jsonl(alpaca(instruction="a " * 1_500_000, output=5)), "line 1",
                             ["'output' must be a string, found a number"]),
    "lone-surrogate": ("d.jsonl", jsonl(GOOD, '{"instruction": "a", "output": "half \\ud83d"}'), "line 2",
                       ["'output'", "surrogate"]),
    # -- alpaca fields
    "instruction-number": ("d.jsonl", jsonl(GOOD, alpaca(instruction=3)), "line 2",
                           ["'instruction' must be a string, found a number"]),
    "output-null": ("d.jsonl", jsonl(alpaca(output=None)), "line 1", ["'output' must be a string, found null"]),
    "output-list": ("d.jsonl", jsonl(GOOD, GOOD, alpaca(output=["a"])), "line 3", ["'output'", "found a list"]),
    "output-boolean": ("d.jsonl", jsonl(alpaca(output=True)), "line 1", ["found a boolean"]),
    "input-number": ("d.jsonl", jsonl(alpaca(input=0)), "line 1", ["'input' must be a string, found a number"]),
    "input-false": ("d.jsonl", jsonl(alpaca(input=False)), "line 1", ["'input'", "boolean"]),
    "system-object": ("d.jsonl", jsonl(alpaca(system={"role": "x"})), "line 1", ["'system'", "found an object"]),
    "output-empty": ("d.jsonl", jsonl(GOOD, alpaca(output="")), "line 2", ["'output' is empty"]),
    "instruction-blank": ("d.jsonl", jsonl(alpaca(instruction=" \n\t")), "line 1", ["'instruction' is empty"]),
    "output-missing": ("d.jsonl", jsonl(GOOD, GOOD, {"instruction": "a"}), "line 3", ["missing 'output'"]),
    # -- text rows
    "text-number": ("d.jsonl", jsonl({"text": 1.5}), "line 1", ["'text' must be a string, found a number"]),
    "text-empty": ("d.jsonl", jsonl({"text": "ok"}, {"text": ""}), "line 2", ["'text' is empty"]),
    "text-missing": ("d.json", json.dumps([{"text": "a"}, {"txt": "b"}]), "row 2", ["missing 'text'"]),
    # -- chat rows
    "messages-string": ("d.jsonl", jsonl({"messages": "hello"}), "line 1", ["'messages' must be a non-empty list",
                                                                           "found a string"]),
    "messages-empty": ("d.jsonl", jsonl(chat(*CHAT), chat()), "line 2", ["found an empty list"]),
    "messages-null": ("d.jsonl", jsonl({"messages": None}), "line 1", ["found null"]),
    "message-not-object": ("d.jsonl", jsonl(chat(CHAT[0], "Frozen water.")), "line 1", ["message 2 must be an object"]),
    "message-no-content": ("d.jsonl", jsonl(chat({"role": "user"}, CHAT[1])), "line 1", ["message 1", "'content'"]),
    "unknown-role": ("d.jsonl", jsonl(chat(*CHAT), chat({"role": "robot", "content": "x"}, CHAT[1])), "line 2",
                     ["unknown role 'robot'"]),
    "role-number": ("d.jsonl", jsonl(chat({"role": 5, "content": "x"}, CHAT[1])), "line 1", ["unknown role 5"]),
    "no-assistant": ("d.jsonl", jsonl(chat(CHAT[0], CHAT[0])), "line 1", ["no assistant turn"]),
    "content-null": ("d.jsonl", jsonl(chat(CHAT[0], {"role": "assistant", "content": None})), "line 1",
                     ["message 2 'content' must be a string, found null"]),
    "reply-empty": ("d.jsonl", jsonl(chat(CHAT[0], {"role": "assistant", "content": ""})), "line 1",
                    ["message 2 'content' is empty"]),
    "content-parts-list": ("d.jsonl", jsonl(chat({"role": "user", "content": [{"type": "text", "text": "x"}]},
                                                 CHAT[1])), "line 1", ["message 1 'content'", "found a list"]),
    "sharegpt-unknown-from": ("d.jsonl", jsonl({"conversations": [{"from": "bot", "value": "x"}]}), "line 1",
                              ["unknown role 'bot'"]),
    "sharegpt-value-number": ("d.jsonl", jsonl({"conversations": [{"from": "human", "value": 1},
                                                                  {"from": "gpt", "value": "x"}]}), "line 1",
                              ["message 1 'value' must be a string"]),
    "conversations-object": ("d.jsonl", jsonl({"conversations": {"from": "human"}}), "line 1",
                             ["'conversations' must be a non-empty list", "found an object"]),
    # -- format
    "undetectable": ("d.jsonl", jsonl({"prompt": "a", "completion": "b"}), "line 1", ["cannot tell the data format"]),
    "ten-thousand-keys": ("d.jsonl", jsonl({f"k{i}": "v" for i in range(10_000)}), "line 1",
                          ["cannot tell the data format", ", ..."]),
    "mixed-formats": ("d.jsonl", jsonl(GOOD, {"text": "a"}), "line 2", ["missing 'instruction', 'output'"]),
}


@pytest.fixture
def train(tmp_path, micro_model):
    """`qshard train` on data in tmp_path (output_dir tmp_path/run): the result and the paths of
    tmp_path and the model folder it changed."""
    def run(data_path, model=micro_model, **data_options):
        recipe = recipe_dict(model, data_path, tmp_path / "run")
        recipe["data"].update(data_options)
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        before = snapshot(tmp_path, model)
        result = run_cli("train", str(tmp_path / "recipe.yaml"))
        return result, changed(before, snapshot(tmp_path, model))
    return run


def write(path, content) -> None:
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_refused_naming_file_and_row(tmp_path, train, case):
    name, content, location, fragments = CASES[case]
    path = tmp_path / name
    write(path, content)
    result, touched = train(path)
    assert_refused(result, f"{path} {location}".strip(), *fragments)
    assert touched == []
    assert len(result.err) < 2000  # a huge row or value is never echoed whole


# -- problems found while tokenizing (after the tokenizer is loaded, before the weights are) -------

TEMPLATES = {  # id -> (chat_template, fragments)
    "raise-exception": ("{{ raise_exception('roles must alternate') }}", ["roles must alternate"]),
    "syntax-error": ("{% for m in messages %}{{ m.content }}", ["TemplateSyntaxError"]),
    "type-error": ("{{ messages[0]['content'] + 1 }}", ["TypeError"]),
    "division-by-zero": ("{{ 1 / 0 }}", ["ZeroDivisionError"]),
    "recursive-macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ["RecursionError"]),
    "memory-bomb": ("{{ 'x' * 10 ** 12 }}", ["MemoryError"]),
    "never-ends": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                   ["within 0.2 s", "data.template: fallback"]),
    "rewrites-history": ("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
                         ["token prefix"]),
}


@pytest.mark.parametrize("case", TEMPLATES)
def test_bad_chat_template_is_refused_naming_the_row(tmp_path, micro_model, train, monkeypatch, case):
    template, fragments = TEMPLATES[case]
    monkeypatch.setattr(data, "RENDER_LIMIT_S", 0.2)
    model = shutil.copytree(micro_model, tmp_path / "model")
    (model / "chat_template.jinja").write_text(template)
    (tmp_path / "d.jsonl").write_text(CHATS)
    start = time.perf_counter()
    result, touched = train(tmp_path / "d.jsonl", model=model)
    assert_refused(result, f"{tmp_path / 'd.jsonl'} row 1", "chat_template", *fragments)
    assert touched == [] and time.perf_counter() - start < 20


def test_reply_first_with_a_template_is_refused(tmp_path, train):
    (tmp_path / "d.jsonl").write_text(jsonl(chat(CHAT[1], CHAT[0], CHAT[1])))
    result, touched = train(tmp_path / "d.jsonl", template="tokenizer")
    assert_refused(result, f"{tmp_path / 'd.jsonl'} row 1", "starts with an assistant message", "fallback")
    assert touched == []


def test_rows_with_nothing_left_to_learn_after_truncation_are_refused(tmp_path, train):
    (tmp_path / "d.jsonl").write_text(jsonl(*[alpaca(instruction="word " * 50) for _ in range(8)]))
    result, touched = train(tmp_path / "d.jsonl", max_length=16)
    assert_refused(result, str(tmp_path / "d.jsonl"), "none of the 8 rows", "data.max_length")
    assert touched == []


def test_a_bad_eval_file_is_named(tmp_path, train):
    (tmp_path / "d.jsonl").write_text(ALPACA)
    (tmp_path / "eval.jsonl").write_text(jsonl(GOOD, alpaca(output=None)))
    result, touched = train(tmp_path / "d.jsonl", eval_path=str(tmp_path / "eval.jsonl"))
    assert_refused(result, f"{tmp_path / 'eval.jsonl'} line 2", "'output' must be a string, found null")
    assert touched == []


# -- bounded cost ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(micro_model):
    return AutoTokenizer.from_pretrained(micro_model)


PIECES = ["the ", "capital ", "of ", "France", "é", "日本語", "🙂", "ß", "e\u0301", "\n", "  ", "\t", ".", "!",
          "<|end|>", "<|user|>", "Ω", "x", "42", "ſt"]


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def random_row(rng: random.Random, fmt: str) -> dict:
    def size() -> int:  # in pieces of ~3 characters
        return rng.choice([0, 3, 300, 3000])

    if fmt == "text":
        return {"text": random_text(rng, size() + 1)}
    if fmt == "alpaca":
        return {"instruction": random_text(rng, size() + 1), "input": random_text(rng, size()),
                "output": random_text(rng, size() + 1), "system": random_text(rng, rng.choice([0, 5]))}
    roles = ["system", "user", "assistant", "user", "assistant"][rng.choice([0, 1]):]
    return {"messages": [{"role": r, "content": random_text(rng, size() + 1)} for r in roles]}


@pytest.mark.parametrize("fmt, template", [("text", "auto"), ("alpaca", "auto"), ("alpaca", "fallback"),
                                           ("chat", "auto"), ("chat", "fallback")])
def test_tokenizing_only_what_survives_truncation_changes_nothing(tokenizer, fmt, template):
    """Each row tokenized with max_length L equals the row tokenized whole (max_length 10^9: nothing is
    cut) and then truncated to L -- on random texts of up to ~10k characters, multi-byte included."""
    rng = random.Random(f"{fmt}-{template}")
    rows = [random_row(rng, fmt) for _ in range(40)]
    whole, _ = data.tokenize_rows(rows, fmt, tokenizer, 10**9, template)
    for max_length in (1, 7, 64, 300):
        kept = [e for e in whole if any(label != data.IGNORE for label in e.labels[:max_length])]
        try:
            examples, report = data.tokenize_rows(rows, fmt, tokenizer, max_length, template)
        except QShardError:  # no row has a target within max_length
            assert kept == []
            continue
        assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids[:max_length], e.labels[:max_length])
                                                               for e in kept]
        assert report.truncated == sum(len(e.input_ids) > max_length for e in kept)


@pytest.mark.parametrize("fmt, template", [("text", "auto"), ("alpaca", "auto"), ("alpaca", "fallback"),
                                           ("chat", "auto"), ("chat", "fallback")])
def test_a_huge_row_costs_what_max_length_allows(tokenizer, monkeypatch, fmt, template):
    """A 6 MB row with max_length 64: the tokenizer sees at most 2 x (64 + CLIP_SLACK) x the longest
    token's characters at once, and a conversation of 20,000 turns renders the template a few times."""
    encoded, rendered = [], []
    encode, render = data._encode, data._render
    monkeypatch.setattr(data, "_encode", lambda tok, text: encoded.append(len(text)) or encode(tok, text))
    monkeypatch.setattr(data, "_render", lambda *a: rendered.append(1) or render(*a))
    huge = "the capital of France " * 300_000
    more = [{"role": r, "content": "more"} for _ in range(10_000) for r in ("user", "assistant")]
    rows = {"text": [{"text": huge}],  # first a row whose prompt fills max_length, then one whose reply does
            "alpaca": [alpaca(input=huge, system=""), alpaca(output=huge, input="", system="")],
            "chat": [chat({"role": "user", "content": huge}, *more),
                     chat(CHAT[0], {"role": "assistant", "content": huge}, *more)]}
    examples, report = data.tokenize_rows(rows[fmt], fmt, tokenizer, 64, template)
    longest = max(map(len, tokenizer.get_vocab()))
    assert (report.examples, report.truncated, len(examples[0].input_ids)) == (1, 1, 64)
    assert max(encoded) <= 2 * (64 + data.CLIP_SLACK) * longest  # 3,328 characters here
    assert len(rendered) <= 6  # per row: the whole, and the turns up to the first past max_length


def test_reading_a_jsonl_file_holds_the_rows_not_the_text(tmp_path):
    """Reading costs the rows it returns plus one line: neither the text nor the parsed records are held."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(alpaca(output=f"{i} " * 50)) + "\n" for i in range(4000)))
    tracemalloc.start()
    rows, _ = data.load_rows(path)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rows) == 4000
    assert peak - kept < path.stat().st_size / 4  # measured: 0.7 % (was 290 %: the text, its lines, all records)


def test_a_template_that_never_ends_stops_within_the_limit(tokenizer, monkeypatch):
    monkeypatch.setattr(data, "RENDER_LIMIT_S", 0.1)
    monkeypatch.setattr(tokenizer, "chat_template", TEMPLATES["never-ends"][0])
    start = time.perf_counter()
    with pytest.raises(QShardError, match="within 0.1 s") as err:
        data.tokenize_rows([{"messages": CHAT}], "chat", tokenizer, 64, source="c.jsonl")
    assert err.value.where == "c.jsonl row 1" and "data.template: fallback" in err.value.fix
    assert time.perf_counter() - start < 5


def test_templates_render_from_a_worker_thread_without_a_limit(tokenizer):
    """SIGALRM reaches only the main thread: elsewhere the rendering runs unlimited, and works."""
    out, rows = [], [{"messages": CHAT}]
    worker = threading.Thread(target=lambda: out.append(data.tokenize_rows(rows, "chat", tokenizer, 64)))
    worker.start()
    worker.join()
    assert out and out[0][1].examples == 1
