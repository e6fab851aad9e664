"""qshard.data: reading, loss masking, truncation, packing and deterministic batching, on a real tokenizer."""

from __future__ import annotations

import copy
import json
from itertools import chain

import pytest
import torch

from qshard.data import (
    IGNORE,
    Example,
    collate,
    epoch_order,
    global_batches,
    load_rows,
    pack,
    pad_token_id,
    split_eval,
    tokenize_rows,
)
from qshard.errors import QShardError
from qshard.tools.tiny import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, of course!"},
]
# A template unlike the fallback, so a test can tell which one rendered the row.
HASH_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer([m["content"] for m in CHAT], vocab_size=512)


@pytest.fixture
def tok(base_tokenizer):
    return copy.deepcopy(base_tokenizer)  # tests change chat_template / special tokens


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def loss_text(tok, example):
    return tok.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])


def assert_labels_are_ids_or_ignored(example):
    assert all(label in (IGNORE, i) for i, label in zip(example.input_ids, example.labels))


def one_example(tok, rows, fmt, template="auto", max_length=512):
    examples, report = tokenize_rows(rows, fmt, tok, max_length, template=template, source="t.jsonl")
    assert len(examples) == 1 and report.examples == 1
    assert_labels_are_ids_or_ignored(examples[0])
    return examples[0]


# ---- formats -------------------------------------------------------------------------------------

def test_alpaca_with_input_and_system_trains_only_on_output_and_end(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 and 2", "output": "Four.",
                                               "system": "Be brief."}])
    rows, fmt = load_rows(path)
    example = one_example(tok, rows, fmt)
    assert fmt == "alpaca"
    assert tok.decode(example.input_ids) == (
        "<|system|>\nBe brief.\n<|user|>\nAdd.\n\n2 and 2\n<|assistant|>\nFour.<|end|>\n")
    assert loss_text(tok, example) == "Four.<|end|>"


def test_alpaca_without_input_or_system_is_a_two_turn_chat(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi!", "input": ""}])
    rows, fmt = load_rows(path)
    example = one_example(tok, rows, fmt)
    assert tok.decode(example.input_ids) == "<|user|>\nSay hi.\n<|assistant|>\nHi!<|end|>\n"
    assert loss_text(tok, example) == "Hi!<|end|>"
    assert sum(label != IGNORE for label in example.labels) == len(tok("Hi!")["input_ids"]) + 1


@pytest.mark.parametrize("template", ["tokenizer", "fallback"])
def test_chat_masks_every_token_but_assistant_replies(tmp_path, tok, template):
    rows, fmt = load_rows(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    example = one_example(tok, rows, fmt, template=template)
    assert fmt == "chat"
    assert loss_text(tok, example) == "Four.<|end|>Paris, of course!<|end|>"
    assert example.labels[-1] == IGNORE  # the newline after <|end|> is formatting, not a target


def test_sharegpt_is_normalised_to_role_and_content(tmp_path, tok):
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in CHAT]
    rows, fmt = load_rows(write_jsonl(tmp_path / "s.jsonl", [{"conversations": share}]))
    assert (fmt, rows) == ("chat", [{"messages": CHAT}])
    assert loss_text(tok, one_example(tok, rows, fmt)) == "Four.<|end|>Paris, of course!<|end|>"


def test_text_rows_train_on_every_token_and_end_with_eos(tmp_path, tok):
    rows, fmt = load_rows(write_jsonl(tmp_path / "t.jsonl", [{"body": "The quick brown fox."}]), text_field="body")
    example = one_example(tok, rows, fmt)
    assert fmt == "text"
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tok.eos_token_id
    assert tok.decode(example.input_ids) == "The quick brown fox.<|end|>"


def test_json_list_reads_like_jsonl_and_blank_lines_are_skipped(tmp_path):
    data = [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in data).replace("\n", "\n\n  \n"))
    assert load_rows(tmp_path / "d.json") == load_rows(tmp_path / "d.jsonl") == (data, "text")


# ---- templates -----------------------------------------------------------------------------------

def test_tokenizer_template_is_used_and_masked_exactly(tmp_path, tok):
    tok.chat_template = HASH_TEMPLATE
    rows, fmt = load_rows(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    example = one_example(tok, rows, fmt, template="auto")
    assert tok.decode(example.input_ids).startswith("### system:\nBe brief.\n\n### user:\n")
    assert loss_text(tok, example) == "Four.<|end|>Paris, of course!<|end|>"


def test_no_chat_template_falls_back_and_tokenizer_choice_refuses(tok):
    tok.chat_template = None
    example = one_example(tok, [{"messages": CHAT[1:3]}], "chat", template="auto")
    assert tok.decode(example.input_ids) == "<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.<|end|>\n"
    with pytest.raises(QShardError, match="no chat_template") as err:
        tokenize_rows([{"messages": CHAT}], "chat", tok, 512, template="tokenizer")
    assert err.value.where == "data.template"


def test_template_that_rewrites_history_is_refused(tok):
    tok.chat_template = "{{ messages | length }}" + HASH_TEMPLATE  # the prefix changes with every turn
    with pytest.raises(QShardError, match="chat_template") as err:
        tokenize_rows([{"messages": CHAT}], "chat", tok, 512, source="c.jsonl")
    assert err.value.where == "c.jsonl row 1" and "fallback" in err.value.fix


def test_template_rejecting_a_conversation_names_the_row(tok):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(QShardError, match="roles must alternate") as err:
        tokenize_rows([{"messages": CHAT}], "chat", tok, 512, source="c.jsonl")
    assert err.value.where == "c.jsonl row 1"


def test_reply_before_any_prompt_needs_the_fallback(tok):
    rows = [{"messages": [{"role": "assistant", "content": "Hi"}]}]
    with pytest.raises(QShardError, match="starts with an assistant message"):
        tokenize_rows(rows, "chat", tok, 64, template="tokenizer")
    assert loss_text(tok, one_example(tok, rows, "chat", template="fallback")) == "Hi<|end|>"


def test_bos_is_added_once_and_never_a_target(tok):
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    bos = tok.bos_token_id
    example = one_example(tok, [{"messages": CHAT[1:3]}], "chat", template="fallback")
    assert example.input_ids[:2] != [bos, bos] and example.input_ids[0] == bos and example.labels[0] == IGNORE
    tok.chat_template = "{{ '<|bos|>' }}" + HASH_TEMPLATE  # the template writes BOS itself
    example = one_example(tok, [{"messages": CHAT[1:3]}], "chat", template="tokenizer")
    assert example.input_ids.count(bos) == 1 and loss_text(tok, example) == "Four.<|end|>"


def test_tokenizer_without_pad_token_pads_with_eos(tok):
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id == 1
    examples, _ = tokenize_rows([{"text": "abc"}, {"text": "a much longer text"}], "text", tok, 64)
    batch = collate(examples, pad_token_id(tok))
    assert batch["input_ids"][0, -1].item() == 1 and batch["labels"][0, -1].item() == IGNORE


# ---- truncation and dropping ---------------------------------------------------------------------

def test_long_sequences_are_cut_to_max_length_and_counted(tok):
    texts = ["fox " * k for k in (2, 5, 10, 20, 40)]
    lengths = [len(tok(t)["input_ids"]) + 1 for t in texts]
    max_length = sorted(lengths)[2]  # two sequences are longer
    examples, report = tokenize_rows([{"text": t} for t in texts], "text", tok, max_length)
    assert report.truncated == 2 and report.dropped_no_target == 0
    assert [len(e.input_ids) for e in examples] == [min(n, max_length) for n in lengths]
    assert report.tokens == report.loss_tokens == sum(min(n, max_length) for n in lengths)
    assert examples[-1].input_ids == tok(texts[-1])["input_ids"][:max_length]  # the start is kept


def test_rows_whose_prompt_fills_max_length_are_dropped(tok):
    short = {"instruction": "Hi", "output": "Hello", "input": "", "system": ""}
    long = {**short, "instruction": "word " * 100}
    _, report = tokenize_rows([short, long, short, long, long], "alpaca", tok, 32, source="a.jsonl")
    assert (report.rows, report.examples, report.dropped_no_target, report.truncated) == (5, 2, 3, 0)
    assert "5 rows -> 2 examples" in report.summary() and "3 dropped" in report.summary()
    with pytest.raises(QShardError, match="none of the 2 rows") as err:
        tokenize_rows([long, long], "alpaca", tok, 32, source="a.jsonl")
    assert "data.max_length" in err.value.fix


def test_max_length_below_one_is_refused(tok):
    with pytest.raises(QShardError) as err:
        tokenize_rows([{"text": "abc"}], "text", tok, 0)
    assert err.value.where == "data.max_length"


# ---- packing, splitting, ordering, collating -----------------------------------------------------

def make_examples(lengths):
    start, out = 0, []
    for n in lengths:
        ids = list(range(start, start + n))
        out.append(Example(ids, [IGNORE] + ids[1:]))
        start += n
    return out


def test_pack_is_greedy_order_preserving_and_loses_nothing():
    examples = make_examples([3, 4, 5, 2, 6, 8])
    packed = pack(examples, 8)
    assert [len(p.input_ids) for p in packed] == [7, 7, 6, 8]
    assert [*chain.from_iterable(p.input_ids for p in packed)] == list(range(28))
    assert [p.starts for p in packed] == [(0, 3), (0, 5), (0,), (0,)]
    # each example's first token is never a target (unpacked, nothing precedes it)
    assert [*chain.from_iterable(p.labels for p in packed)] == [*chain.from_iterable(e.labels for e in examples)]


def test_split_eval_is_deterministic_and_sized():
    examples = make_examples([1] * 10)
    train, held = split_eval(examples, 0.2, seed=7)
    assert (len(train), len(held)) == (8, 2)
    assert split_eval(examples, 0.2, seed=7) == (train, held)
    assert split_eval(examples, 0.2, seed=8)[1] != held
    assert sorted(e.input_ids[0] for e in train + held) == list(range(10))
    assert [len(part) for part in split_eval(examples, 0.01, seed=0)] == [9, 1]
    assert split_eval(examples, 0.0, seed=0) == (examples, [])
    with pytest.raises(QShardError, match="leaves none to train on"):
        split_eval(make_examples([1]), 0.5, seed=0)


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=3, epoch=0)
    assert order != epoch_order(50, seed=3, epoch=1)
    assert order == torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1000003)).tolist()


def test_global_batches_drop_the_incomplete_tail():
    batches = global_batches(10, 3, seed=0, epoch=2)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert [*chain.from_iterable(batches)] == epoch_order(10, seed=0, epoch=2)[:9]
    with pytest.raises(QShardError, match="4 training sequences cannot fill one global batch of 8") as err:
        global_batches(4, 8, seed=0, epoch=0)
    assert "gradient_accumulation_steps" in err.value.where


def test_collate_right_pads_to_the_longest():
    batch = collate(make_examples([2, 4]), pad_id=99)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 4) for k in ("input_ids", "attention_mask", "labels")}
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert batch["input_ids"].tolist() == [[0, 1, 99, 99], [2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 1, IGNORE, IGNORE], [IGNORE, 3, 4, 5]]


# ---- bad input -----------------------------------------------------------------------------------

GOOD = json.dumps({"instruction": "a", "output": "b"})


@pytest.mark.parametrize("name, content, where, what", [
    ("bad.jsonl", f"{GOOD}\n{GOOD}\n{{\"instruction\": \n", "bad.jsonl line 3", "invalid JSON"),
    ("bad.jsonl", f"{GOOD}\n\n[1, 2]\n", "bad.jsonl line 3", "row is a JSON list"),
    ("bad.json", '[\n{"text": "a"},\n{"text": }\n]', "bad.json row 2", r"invalid JSON: .* \(line 3, column 10\)"),
    ("bad.json", '{"text": "a"}', "bad.json", "expected a JSON list"),
    ("bad.jsonl", f'{GOOD}\n{{"instruction": "a"}}\n', "bad.jsonl line 2", "missing 'output' for the alpaca"),
    ("bad.json", json.dumps([{"text": "a"}, {"txt": "b"}]), "bad.json row 2", "missing 'text'"),
    ("bad.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "bad.jsonl line 1",
     "unknown role 'robot'"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "x"}]}), "bad.jsonl line 1",
     "no assistant turn"),
    ("bad.jsonl", json.dumps({"messages": [{"role": "user", "content": 3}]}), "bad.jsonl line 1",
     "'content' must be a string"),
    ("bad.jsonl", json.dumps({"prompt": "a", "completion": "b"}), "bad.jsonl line 1", "cannot tell the data format"),
    ("bad.jsonl", "\n \n", "bad.jsonl", "no rows"),
    ("bad.csv", "text\na\n", "bad.csv", "unsupported data file type"),
])
def test_bad_files_raise_with_file_and_line(tmp_path, name, content, where, what):
    (tmp_path / name).write_text(content)
    with pytest.raises(QShardError, match=what) as err:
        load_rows(tmp_path / name)
    assert err.value.where == str(tmp_path / where)


def test_undetectable_row_lists_the_three_shapes(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    with pytest.raises(QShardError) as err:
        load_rows(path)
    assert all(shape in err.value.fix for shape in ("alpaca:", "chat:", "text:"))


def test_missing_file_and_unknown_format_name_the_option(tmp_path):
    with pytest.raises(QShardError, match="not found") as err:
        load_rows(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value) and "data.path" in err.value.fix
    with pytest.raises(QShardError, match="unknown data format 'csv'") as err:
        load_rows(tmp_path / "nope.jsonl", fmt="csv")
    assert err.value.where == "data.format"


def test_explicit_format_checks_every_row_against_it(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(QShardError, match="missing 'messages'") as err:
        load_rows(path, fmt="chat")
    assert err.value.where == f"{path} line 1"
