"""`qshard export --format checkpoint`: a run on a GPTQ / AWQ / compressed-tensors base written back in that format,
the merged weights re-quantized onto the base checkpoint's own scales and zero points.

The fixtures were made by gptqmodel, autoawq and llm-compressor (tests/fixtures/ptq/); tests/test_ptq.py checks that
re-quantizing their dequantized weights gives their stored codes back bit for bit. Here: the export's layout is the
library's, a zero adapter gives the checkpoint back unchanged, the export check holds with DoRA too, a
compressed-tensors export loads in transformers + compressed-tensors (the quantizer's environment) with the logits
qshard's reader gives, and what cannot be written in a base's own format is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qshard.errors import QShardError
from qshard.tools.export import export
from tests.helpers import REPO, assert_transformers_reads_as_qshard
from tests.hostile import run_cli
from tests.test_export import QUIET, _train

FIXTURES = REPO / "tests" / "fixtures" / "ptq"
# one per format and packing: GPTQ v1 zero points with act-order, GPTQ 8-bit, AWQ's interleave, compressed-tensors
BASES = ["gptq_qwen2_w4_g32_asym_actorder", "gptq_llama_w8_g32_sym", "autoawq_llama_w4_g64_zp",
         "ct_qwen2_w4a16_g32_asym"]
CODES = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}


@pytest.fixture(scope="module")
def ptq_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ptq-runs")
    return {name: _train(FIXTURES / name, root, name, "checkpoint") for name in BASES}


def _quant_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name", BASES)
def test_export_keeps_the_checkpoints_own_layout_and_reproduces_base_plus_requantized_merge(ptq_runs, name, tmp_path):
    """The folder holds every quantized layer's tensors under the checkpoint's names, dtypes and shapes, its
    scales, zero points and g_idx byte for byte, and config.json's quantization_config as it was; only the codes
    of the adapted layers change. The check (qshard's reader against base + adapter, merged weights re-quantized
    the same way) agrees exactly in float32 (measured: 0), and the per-layer figures are recorded."""
    out = tmp_path / "out"
    result = export(ptq_runs[name], out, dtype="fp32", format="checkpoint", **QUIET)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4 * result.check["max_abs_logit"]
    base, ours = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(out / "model.safetensors"))
    qc = _quant_config(FIXTURES / name)
    assert _quant_config(out) == qc
    codes = CODES[qc["quant_method"]]
    quantized = {k.rsplit(".", 1)[0] for k in base if k.endswith("." + codes)}
    assert len(quantized) == 14 and set(result.layers) == quantized
    for key, tensor in base.items():
        if key.rsplit(".", 1)[0] not in quantized:
            continue
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        if not key.endswith("." + codes):
            assert torch.equal(ours[key], tensor), key  # scales, zero points, g_idx, weight_shape as stored
    changed = [m for m in quantized if not torch.equal(ours[f"{m}.{codes}"], base[f"{m}.{codes}"])]
    assert len(changed) == 14  # 4 training steps at lr 1e-2 move some codes of every layer
    figures = result.layers[changed[0]]
    assert 0 < figures["codes_changed"] < 1 and 0 < figures["requant_rel"] <= 1.5  # 8-bit: most codes move


@pytest.mark.parametrize("name", ["gptq_qwen2_w4_g32_asym_actorder", "ct_qwen2_w4a16_g32_asym"])
def test_zero_adapter_export_gives_back_the_checkpoint_tensor_for_tensor(ptq_runs, name, tmp_path):
    """W + 0 on its own grid is W: every quantized layer's tensors come back bit for bit."""
    moved = tmp_path / "run"
    shutil.copytree(ptq_runs[name], moved)
    weights = moved / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(str(weights)).items()},
              str(weights))
    result = export(moved, tmp_path / "out", dtype="fp32", format="checkpoint", **QUIET)
    assert len(result.layers) == 14 and all(f["codes_changed"] == 0 for f in result.layers.values())
    base, ours = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(tmp_path / "out" /
                                                                                     "model.safetensors"))
    codes = CODES[_quant_config(FIXTURES / name)["quant_method"]]
    quantized = {k.rsplit(".", 1)[0] for k in base if k.endswith("." + codes)}
    packed = [k for k in base if k.rsplit(".", 1)[0] in quantized]
    assert len(packed) >= 14 * 3 and all(torch.equal(ours[k], base[k]) for k in packed)


def test_dora_run_on_a_gptq_base_exports_in_gptq(tmp_path):
    """DoRA's magnitude vector is folded in before the re-quantization (merge.merged_weight)."""
    run_dir = _train(FIXTURES / "gptq_llama_w4_g32_sym", tmp_path, "dora", "checkpoint", dora=True)
    result = export(run_dir, tmp_path / "out", dtype="fp32", format="checkpoint", **QUIET)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4 * result.check["max_abs_logit"]
    assert len(result.layers) == 14


def test_compressed_tensors_export_loads_in_transformers_with_the_logits_qshard_reads(ptq_runs, tmp_path):
    """The reference we did not write: transformers 5.17 + compressed-tensors 0.19 (the quantizer's environment,
    `make quantizers`) load the bf16 export and give the logits qshard's reader gives."""
    out = tmp_path / "out"
    run = run_cli("export", str(ptq_runs["ct_qwen2_w4a16_g32_asym"]), str(out), "--format", "checkpoint")
    assert run.code == 0, run.err[-3000:]
    assert "check passed" in run.out and "share of the layer's codes the merge changed" in run.out
    assert_transformers_reads_as_qshard(out, [[1, 5, 9, 13, 17, 21, 2, 3], [4, 4, 8, 15, 16, 23, 42]])


def test_what_has_no_own_format_is_refused_before_anything_is_written(ptq_runs, micro_model, tmp_path):
    gptq_run = ptq_runs["gptq_qwen2_w4_g32_asym_actorder"]
    nf4_on_gptq = _train(FIXTURES / "gptq_llama_w4_g32_sym", tmp_path, "nf4-on-gptq", "nf4")
    dense_nf4 = _train(micro_model, tmp_path, "nf4", "nf4")
    cases = [(dense_nf4, {}, "--format nf4"), (nf4_on_gptq, {}, "converted its gptq base to nf4"),
             (gptq_run, {"merge_into": str(micro_model)}, "--merge-into")]
    for run_dir, extra, named in cases:
        with pytest.raises(QShardError) as refused:
            export(run_dir, tmp_path / "out", format="checkpoint", **extra, **QUIET)
        assert named in f"{refused.value.what} {refused.value.where} {refused.value.fix}", refused.value
        assert not (tmp_path / "out").exists()
