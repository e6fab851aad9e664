"""Load-time sharding (qshard/shardload.py): exact pieces, bit-identical models, no rank holds the whole.

The distributed checks run in two 2-rank torchrun launches: tests/shardload_worker.py (gathered
parameters vs the whole load, largest tensor touched while loading) and tests/dist_worker.py
(training with shard_on_load on and off: same losses and logits).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qshard.errors import QShardError
from qshard.model import shardload
from qshard.model.load import CheckpointReader, QuantSpec, load_base_model, open_base
from qshard.model.shardload import shard_span, why_not
from qshard.quant.bnb4bit import Linear4bit
from qshard.quant.bnb8bit import Linear8bit
from tests.helpers import REPO, recipe_dict, run_cells, torchrun, write_rows
from tests.shardload_worker import attach

LAYERS = {"nf4-dq": (Linear4bit, {"quant_type": "nf4", "double_quant": True}),
          "nf4": (Linear4bit, {"quant_type": "nf4", "double_quant": False}),
          "fp4-dq": (Linear4bit, {"quant_type": "fp4", "double_quant": True}),
          "int8": (Linear8bit, {})}
# bitsandbytes' CUDA kernels too, where there is a GPU (bench/cuda_check.py runs this test there)
DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("shape", [(200, 96), (37, 64), (64, 100), (688, 256), (5, 24)])
def test_pieces_equal_the_whole_tensors_quantization(kind, shape, device):
    cls, options = LAYERS[kind]
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(device, torch.bfloat16)
    whole = cls.from_float(weight, **options)
    storage = {n: p for n, p in whole.named_parameters() if n != "bias"}
    for world in (1, 2, 3, 4):
        for rank in range(world):
            for split in ("rows", "flat"):  # FSDP2 owns whole rows, ZeRO-3 any range of the flattened tensor
                owned = {n: _owned(p, rank, world, split) for n, p in storage.items()}
                read = []
                pieces = whole.quantize_pieces(lambda a, b: read.append(b - a) or weight[a:b], owned, world)
                for name, (start, stop) in owned.items():
                    assert torch.equal(pieces[name], storage[name].reshape(-1)[start:stop]), \
                        (kind, shape, world, rank, name, split)
            assert max(read) <= -(-shape[0] // world) + 64, read  # never the whole weight at once (world > 1)


def _owned(p: torch.Tensor, rank: int, world: int, split: str) -> tuple[int, int]:
    if split == "flat":
        return shard_span(p.numel(), rank, world)
    start, stop = shard_span(p.shape[0], rank, world)
    return start * p[0].numel(), stop * p[0].numel()


def test_shard_span_is_torch_chunk():
    for rows in (0, 1, 5, 8, 9):
        for world in (1, 2, 3, 4):
            chunks = list(torch.arange(rows).chunk(world)) if rows else []
            for rank in range(world):
                start, stop = shard_span(rows, rank, world)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, stop)) == expected


def test_checkpoint_reader_reads_rows_and_whole_tensors(tmp_path):
    tensors = {"a": torch.randn(7, 3).to(torch.bfloat16), "b": torch.tensor(2.5), "c": torch.arange(9, dtype=torch.int32),
               "d": torch.randn(4, 2, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader([tmp_path / "model.safetensors"])
    assert sorted(reader.keys()) == sorted(tensors)
    for key, t in tensors.items():
        assert torch.equal(reader.rows(key), t)
    assert torch.equal(reader.rows("a", 2, 5), tensors["a"][2:5])
    assert torch.equal(reader.rows("d", 3), tensors["d"][3:])
    assert torch.equal(reader.rows("c", 8, 100), tensors["c"][8:])
    assert torch.equal(reader.flat("a", 5, 17), tensors["a"].reshape(-1)[5:17])  # starts and ends inside rows
    assert torch.equal(reader.flat("a", 4, 9, dtype=torch.float32), tensors["a"].reshape(-1)[4:9].float())
    reader.CHUNK_BYTES = 8  # bf16 converted 4 stored elements at a time
    out = torch.empty(14, dtype=torch.float32)
    assert reader.flat("a", 3, 17, out=out) is out
    assert torch.equal(out, tensors["a"].reshape(-1)[3:17].float())


def test_a_tensor_the_checkpoint_lacks_is_named_before_anything_is_read(micro_model, tmp_path):
    shutil.copytree(micro_model, tmp_path / "m")
    weights = load_file(str(micro_model / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    missing = r"lacks 1 tensor\(s\) the architecture needs: model\.layers\.1\.mlp\.down_proj\.weight\n"
    with pytest.raises(QShardError, match=missing):  # open_base compares the headers with the skeleton
        open_base(str(tmp_path / "m"), quant=QuantSpec("nf4"))
    _, skeleton = open_base(str(micro_model), quant=QuantSpec("nf4"))  # the tensor went missing after open_base
    model = attach(skeleton.requires_grad_(False))
    touched = []
    with pytest.raises(QShardError, match=missing):
        shardload._stream_shards(model.get_base_model(), tmp_path / "m", 2, lambda p: (0, p.numel()),
                                 lambda p, owned: touched.append(p), torch.device("cpu"), QuantSpec("nf4"),
                                 torch.float32)
    assert touched == []  # no shard was allocated or read


def test_a_ptq_layer_missing_a_tensor_is_named_while_the_skeleton_is_built(tmp_path):
    """A GPTQ checkpoint without one layer's qzeros fails in `_prepared` (before any shard exists), naming the
    tensor and the layer; the layer shells are otherwise the very layers the whole load builds."""
    fixture = REPO / "tests" / "fixtures" / "ptq" / PTQ_MODELS["gptq"]
    shutil.copytree(fixture, tmp_path / "m")
    weights = load_file(str(fixture / "model.safetensors"))
    del weights["model.layers.0.self_attn.k_proj.qzeros"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QShardError, match=r"qzeros missing for model\.layers\.0\.self_attn\.k_proj"):
        open_base(str(tmp_path / "m"), quant=QuantSpec("checkpoint"))
    _, skeleton = open_base(str(fixture), quant=QuantSpec("checkpoint"))  # the tensor went missing after open_base
    with pytest.raises(QShardError, match=r"qzeros missing for model\.layers\.0\.self_attn\.k_proj"):
        shardload._prepared(skeleton, tmp_path / "m", QuantSpec("checkpoint"))

    model_dir, skeleton = open_base(str(fixture), quant=QuantSpec("checkpoint"))
    shells = dict(shardload._prepared(skeleton, model_dir, QuantSpec("checkpoint")).named_parameters())
    model_dir, skeleton = open_base(str(fixture), quant=QuantSpec("checkpoint"))
    whole = dict(load_base_model(skeleton, model_dir, quant=QuantSpec("checkpoint"), log=lambda *_: None)
                 .named_parameters())
    assert {n: (p.shape, p.dtype) for n, p in shells.items()} == {n: (p.shape, p.dtype) for n, p in whole.items()}
    assert all(p.device.type == "meta" for p in shells.values())


def test_checkpoint_reader_names_a_truncated_file(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(QShardError, match="model.safetensors ends inside tensor w: the file is truncated"):
        CheckpointReader([tmp_path / "model.safetensors"]).rows("w")


def test_why_not_names_each_reason():
    assert why_not("fsdp2", 2, use_dora=False, enabled=True) is None
    assert why_not("zero3_offload", 4, use_dora=False, enabled=True) is None
    assert "one process" in why_not("fsdp2", 1, use_dora=False, enabled=True)
    assert "does not shard" in why_not("zero2", 2, use_dora=False, enabled=True)
    assert "shard_on_load" in why_not("fsdp2", 2, use_dora=False, enabled=False)
    assert "DoRA" in why_not("zero3", 2, use_dora=True, enabled=True)
    plain = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert why_not("zero3_offload", 2, use_dora=False, enabled=True, deepspeed_config=plain) is None
    for zero, named in (({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
                        ({"mics_shard_size": 4}, "mics_shard_size"),
                        ({"zero_quantized_nontrainable_weights": True}, "zero_quantized_nontrainable_weights"),
                        ({"offload_param": {"device": "nvme"}}, "offload_param.device=nvme")):
        reason = why_not("zero3", 2, use_dora=False, enabled=True,
                         deepspeed_config={"zero_optimization": {"stage": 3, **zero}})
        assert named in reason and "partitions out otherwise" in reason


CASES = [("fsdp2", "nf4", "float32", "micro"), ("fsdp2", "none", "bfloat16", "micro"),
         ("fsdp2", "int8", "float32", "micro"), ("fsdp2", "nf4", "float32", "tied"),
         ("zero3", "nf4", "float32", "micro"), ("zero3", "none", "bfloat16", "micro"),
         ("zero3", "int8", "float32", "micro"), ("zero3", "nf4", "float32", "tied")]
# PTQ checkpoints kept as they are (tests/fixtures/ptq, made by gptqmodel / autoawq / llmcompressor): GPTQ
# v1 zero points (rewritten on build), act-order g_idx, AWQ gemm, compressed-tensors (shape stored as values)
PTQ_MODELS = {"gptq": "gptq_llama_w4_g32_asym", "gptq-actorder": "gptq_qwen2_w4_g32_asym_actorder",
              "awq": "autoawq_llama_w4_g64_zp", "ct": "ct_qwen2_w4a16_g32_asym"}
CASES += [(engine, "checkpoint", "auto", name) for engine in ("fsdp2", "zero3") for name in PTQ_MODELS]
# ... and converted on load (dequantized, then quantized by bitsandbytes, or left dense)
CASES += [("fsdp2", "nf4", "auto", "gptq"), ("zero3", "nf4", "auto", "gptq-actorder"), ("zero3", "int8", "auto", "awq"),
          ("fsdp2", "none", "auto", "ct")]


@pytest.fixture(scope="module")
def micro_tied(micro_model, tmp_path_factory):
    """The micro Llama with its head tied to the embeddings (saved once, as transformers saves tied weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(micro_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("micro-tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loads(micro_model, micro_tied, tmp_path_factory):
    out = tmp_path_factory.mktemp("shardload")
    spec = out / "spec.json"
    models = {"micro": str(micro_model), "tied": str(micro_tied)}
    models |= {name: str(REPO / "tests" / "fixtures" / "ptq" / folder) for name, folder in PTQ_MODELS.items()}
    spec.write_text(json.dumps({"models": models, "out": str(out), "cases": CASES}))
    torchrun("tests/shardload_worker.py", spec)
    return {case: [json.loads((out / f"{'-'.join(case)}-rank{k}.json").read_text()) for k in range(2)]
            for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_gathered_parameters_are_bit_identical_to_the_whole_load(loads, case):
    for rank in loads[case]:
        assert rank["names"] and not rank["missing"], rank["missing"]
        assert rank["differ"] == [], rank["differ"]  # base (packed codes, scales, dense) and the initial LoRA


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_sharded_load_never_touches_a_whole_parameter(loads, case):
    for rank in loads[case]:
        # the tracker does see whole parameters when the model is loaded whole...
        assert rank["largest_whole_load"] >= rank["largest_param"]
        if case[3] in PTQ_MODELS and case[1] != "checkpoint":
            # ...a converted PTQ layer is dequantized whole, one layer at a time (in fp32 for the error figure)
            assert rank["largest_sharded_load"] <= 4 * rank["largest_linear_elements"], rank
        else:
            # ...and under sharded loading no tensor is bigger than about half of the largest parameter
            assert rank["largest_sharded_load"] <= 0.55 * rank["largest_param"], rank


TRAIN_CASES = [("fsdp2", "nf4"), ("zero3", "nf4"), ("fsdp2", "none"), ("zero3", "none"), ("zero3", "nf4-bf16"),
               ("zero3_offload", "nf4"), ("fsdp2", "gptq"), ("zero3", "gptq"), ("zero3", "gptq-nf4")]


@pytest.fixture(scope="module")
def trained(micro_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("shardload-train")
    data = root / "train.jsonl"
    write_rows(data)
    cells = []
    for engine, method in TRAIN_CASES:
        for on in (True, False):
            name = f"{engine}-{method}-{'sharded' if on else 'whole'}"
            if method.startswith("gptq"):  # a GPTQ checkpoint kept as it is, or converted to NF4
                model = REPO / "tests" / "fixtures" / "ptq" / PTQ_MODELS["gptq"]
                recipe = recipe_dict(model, data, root / name, max_steps=3, micro_batch_size=2)
                recipe["model"]["dtype"] = "auto"
                recipe["quantization"]["method"] = "checkpoint" if method == "gptq" else "nf4"
            else:
                recipe = recipe_dict(micro_model, data, root / name, max_steps=3, micro_batch_size=2)
                recipe["model"]["dtype"] = "bfloat16" if method == "none" else "float32"
                recipe["quantization"]["method"] = method.split("-")[0]
            if method.endswith("bf16"):  # DeepSpeed casts the model to bf16: the adapters too, however loaded
                recipe["train"]["precision"] = "bf16"
            recipe["distributed"] = ({"engine": "fsdp2"} if engine == "fsdp2" else
                                     {"engine": "deepspeed", "zero_stage": 3}) | {"shard_on_load": on}
            if engine == "zero3_offload":  # partitions on the CPU (here the compute device too), pinned
                recipe["distributed"] |= {"offload_params": "cpu", "offload_optimizer": "cpu"}
            cells.append({"name": name, "recipe": recipe})
    run_cells(root, cells, [[1, 5, 7, 9, 11, 13]])
    return {c["name"]: [json.loads((root / c["name"] / f"result-rank{k}.json").read_text()) for k in range(2)]
            + [json.loads((root / c["name"] / "adapter" / "adapter_config.json").read_text())] for c in cells}


@pytest.mark.parametrize("engine,method", TRAIN_CASES, ids=[f"{e}-{m}" for e, m in TRAIN_CASES])
def test_training_after_a_sharded_load_is_identical(trained, engine, method):
    *sharded_ranks, sharded_config = trained[f"{engine}-{method}-sharded"]
    *whole_ranks, whole_config = trained[f"{engine}-{method}-whole"]
    assert sharded_config == whole_config  # the PEFT adapter folder's config, base model path included
    for sharded, whole in zip(sharded_ranks, whole_ranks):
        assert "error" not in sharded and "error" not in whole
        if sharded["rank"] == 0:  # the rank that logs
            assert sharded["load"].startswith("loading the base sharded"), sharded["load"]
            assert whole["load"].startswith("loading the whole"), whole["load"]
        assert sharded["losses"] == whole["losses"]  # every step, bit for bit (the first included)
        assert sharded["logits"] == whole["logits"]  # the trained model, on a probe batch
        assert sharded["sharding"] == whole["sharding"]  # the same bytes per rank once training runs
