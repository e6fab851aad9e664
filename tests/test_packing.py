"""Packing keeps examples apart: a packed sequence of three examples gives each example exactly the
loss and logits it has alone (position ids restart per example; transformers turns the restarts into
block-diagonal causal attention), and the same batch without that isolation does not."""

from __future__ import annotations

from itertools import chain

import pytest
import torch
from transformers import AutoTokenizer

from qshard.data import IGNORE, Example, collate, pack, pad_token_id, tokenize_rows
from qshard.model.load import QuantSpec, load_model
from qshard.tools.tiny import init_tiny
from qshard.train import token_loss_sum
from tests.helpers import ROWS

CPU = torch.device("cpu")
# fp32 on CPU: the packed and unpacked sums agree to a few ulps (measured: at most 8e-6 on a sum of ~150)
RTOL, ATOL = 1e-6, 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch_model(request, micro_model, micro_qwen, tmp_path_factory):
    """(model, tokenizer) of each architecture qshard trains; Mistral uses sliding-window masks."""
    if request.param == "llama":
        path = micro_model
    elif request.param == "qwen2":
        path = micro_qwen
    else:
        path = init_tiny(tmp_path_factory.mktemp("models") / "micro-mistral", arch="mistral", size="micro",
                         texts=[" ".join(r.values()) for r in ROWS])
    model = load_model(str(path), dtype="float32", quant=QuantSpec(method="none"), log=lambda *_: None)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def three_examples(tokenizer):
    """Two alpaca examples and a text example; the text one's first token is a label when unpacked
    (the tiny tokenizer has no BOS), so packing must stop it being predicted across the boundary."""
    alpaca, _ = tokenize_rows([{**r, "system": ""} for r in ROWS[:2]], "alpaca", tokenizer, 64)
    text, _ = tokenize_rows([{"text": ROWS[3]["output"]}], "text", tokenizer, 64)
    return alpaca + text


@torch.no_grad()
def loss(model, examples, pad_id) -> torch.Tensor:
    return token_loss_sum(model, collate(examples, pad_id), CPU)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_is_the_sum_of_the_examples_losses(arch_model, attention):
    model, tokenizer = arch_model
    model.set_attn_implementation(attention)
    examples, pad_id = three_examples(tokenizer), pad_token_id(tokenizer)
    packed = pack(examples, max_length=64)
    assert len(packed) == 1 and packed[0].starts == (0, 21, 39)
    alone = sum(loss(model, [e], pad_id) for e in examples)
    assert torch.allclose(loss(model, packed, pad_id), alone, rtol=RTOL, atol=ATOL)
    # in a batch with a padded row (the second example alone, padded to the packed row's length)
    batch = loss(model, packed + [examples[1]], pad_id)
    assert torch.allclose(batch, alone + loss(model, [examples[1]], pad_id), rtol=RTOL, atol=ATOL)


def test_without_isolation_the_packed_loss_differs(arch_model):
    """The check above can fail: plain causal attention over the packed row (attention_mask of ones,
    positions 0..n-1) lets later examples see earlier ones, and joining without masking the boundary
    label trains the text example's first token from the previous example's end."""
    model, tokenizer = arch_model
    examples, pad_id = three_examples(tokenizer), pad_token_id(tokenizer)
    alone = sum(loss(model, [e], pad_id) for e in examples)
    packed = collate(pack(examples, 64), pad_id)
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"],
             "attention_mask": torch.ones_like(packed["input_ids"])}
    with torch.no_grad():
        assert abs(float(token_loss_sum(model, leaky, CPU) - alone)) > 1.0  # measured: 6.2 to 7.1
    concatenated = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
                    "labels": torch.tensor([[*chain.from_iterable(e.labels for e in examples)]])}
    with torch.no_grad():
        assert float(token_loss_sum(model, concatenated, CPU) - alone) > 1.0  # one extra, cross-example target


@torch.no_grad()
def test_each_packed_example_has_its_unpacked_logits(arch_model):
    model, tokenizer = arch_model
    model.set_attn_implementation("sdpa")
    examples, pad_id = three_examples(tokenizer), pad_token_id(tokenizer)
    packed = pack(examples, 64)[0]
    batch = collate([packed], pad_id)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    for start, example in zip(packed.starts, examples):
        alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
        assert torch.allclose(logits[start:start + len(example.input_ids)], alone, atol=1e-5)


def test_collate_restarts_positions_per_example_and_pads_as_the_last():
    first, second, alone = Example([1, 1, 1], [1, 1, 1]), Example([2, 2], [2, 2]), Example([5] * 4, [IGNORE, 5, 5, 5])
    batch = collate([*pack([first, second], 8), alone], pad_id=9)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see collate
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["input_ids"].tolist() == [[1, 1, 1, 2, 2], [5, 5, 5, 5, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 1, 1, IGNORE, 2], [IGNORE, 5, 5, 5, IGNORE]]


def test_a_packed_run_starts_from_the_unpacked_runs_loss(tmp_path, micro_model, alpaca_file):
    """`qshard train` end to end (NF4 base, LoRA): one step over all eight rows, packed or not, sees the
    same first-step loss (the token mean over every target, before any update)."""
    import yaml

    from qshard.config import load_recipe
    from qshard.train import run
    from tests.helpers import recipe_dict

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    examples, _ = tokenize_rows([{**r, "system": ""} for r in ROWS], "alpaca", tokenizer, 64)
    sequences = len(pack(examples, 64))
    assert sequences < len(examples) == 8
    losses = []
    for packing, batch in ((False, 8), (True, sequences)):
        recipe = recipe_dict(micro_model, alpaca_file, tmp_path / f"run-{packing}", micro_batch_size=batch, max_steps=1)
        recipe["data"]["packing"] = packing
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        losses.append(run(load_recipe(tmp_path / "recipe.yaml"), log=lambda *_: None).losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
