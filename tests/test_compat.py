"""qshard/_compat.py: each workaround's upstream quirk still exists, and the workaround still removes it.

A failure here after an upgrade means upstream changed: the workaround is either no longer needed
(remove it, as its docstring says) or no longer works (fix it here before the multi-process tests fail).
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from qshard import _compat

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what qshard's DeepSpeed engine does on CPU, before importing it

ROOT = Path(__file__).resolve().parents[1]
UNSUPPORTED = "Unsupported layer type"


def _micro_llama(quantized: bool):
    """A random 2-layer micro Llama (hidden 64), its linears but the head optionally qshard NF4 layers."""
    from transformers import AutoModelForCausalLM

    from qshard.quant.bnb4bit import Linear4bit
    from qshard.tools.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", "micro", vocab_size=64))
    if quantized:
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, Linear4bit.from_float(module.weight.detach()))
    return model


def _peft(model):
    """PEFT's get_peft_model, with our quantized layers registered as qshard.model.lora.attach_lora registers them."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners import lora

    from qshard.model.load import QUANT_LAYERS

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")
    _compat.peft_register_custom_layers(config, {cls: lora.Linear for cls in QUANT_LAYERS})
    return get_peft_model(model, config)


def _in_one_rank_group(body: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter inside a one-rank gloo process group (its stdout is the result)."""
    code = ("import torch, torch.distributed as dist\nfrom qshard import _compat\nfrom qshard.runtime import _free_port\n"
            "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)\n"
            + body + "\ndist.destroy_process_group()\n_compat.exit_without_teardown(0)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _recorded(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call()
    return seen


def _messages(seen, text: str) -> list[str]:
    return [str(w.message) for w in seen if text in str(w.message)]


@pytest.fixture
def noise_state():
    """Undo quiet_known_noise (warning filters, bitsandbytes logger level, DS_ACCELERATOR) after the test."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, accelerator = logger.level, os.environ.get("DS_ACCELERATOR")
    with warnings.catch_warnings():
        yield
    logger.setLevel(level)
    if accelerator is None:
        os.environ.pop("DS_ACCELERATOR", None)
    else:
        os.environ["DS_ACCELERATOR"] = accelerator


# quiet_peft_custom_layer_warning: upstream half
def test_peft_still_warns_unsupported_layer_type_for_registered_qshard_layers():
    seen = _recorded(lambda: _peft(_micro_llama(quantized=True)))
    warned = _messages(seen, UNSUPPORTED)
    assert warned, "PEFT no longer warns for registered custom layers: remove quiet_peft_custom_layer_warning"
    assert all("qshard.quant.bnb4bit.Linear4bit" in m for m in warned), warned


# quiet_peft_custom_layer_warning: our half (PEFT still wraps the layers from in_features/out_features alone)
def test_quiet_peft_custom_layer_warning_silences_it_and_peft_still_wraps_the_layers():
    from peft.tuners import lora

    from qshard.quant.bnb4bit import Linear4bit

    def attach():
        with _compat.quiet_peft_custom_layer_warning():
            return _peft(_micro_llama(quantized=True))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = attach()
    assert not _messages(seen, UNSUPPORTED)
    wrapped = [m for m in model.modules() if isinstance(m, lora.Linear)]
    assert len(wrapped) == 4  # q_proj and down_proj of 2 layers
    for m in wrapped:
        assert isinstance(m.base_layer, Linear4bit)
        assert m.lora_A["default"].weight.shape == (4, m.base_layer.in_features)
        assert m.lora_B["default"].weight.shape == (m.base_layer.out_features, 4)


# quiet_peft_custom_layer_warning: applied where qshard attaches LoRA
def test_attach_lora_does_not_warn_unsupported_layer_type():
    from qshard.model.lora import attach_lora

    model = _micro_llama(quantized=True)
    seen = _recorded(lambda: attach_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj"], use_dora=False,
                                         seed=0))
    assert not _messages(seen, UNSUPPORTED)


# peft_register_custom_layers: PEFT still refuses a layer type it does not know, unless registered through the
# private hook, which is still there
def test_peft_still_needs_its_private_hook_to_wrap_qshard_layers():
    from peft import LoraConfig, get_peft_model
    from peft.tuners import lora

    assert callable(getattr(lora.LoraConfig, "_register_custom_module", None)), \
        "PEFT renamed or removed _register_custom_module: look for its public replacement"
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_micro_llama(quantized=True), config)
    wrapped = [m for m in _peft(_micro_llama(quantized=True)).modules() if isinstance(m, lora.Linear)]
    assert len(wrapped) == 4


# peft_weight_placeholders: PEFT still reads `.weight` of a wrapped layer many times while attaching (upstream
# half), and with the placeholders on nothing is dequantized for it (our half)
def test_peft_still_reads_weight_repeatedly_and_placeholders_spare_the_dequantization():
    from qshard.quant.bnb4bit import Linear4bit

    reads, dequantized = [], []

    class Counted(Linear4bit):
        @property
        def weight(self):
            reads.append(self)
            return super().weight

        def dequantize(self):
            dequantized.append(self)
            return super().dequantize()

    model = _micro_llama(quantized=False)
    for name, module in list(model.named_modules()):
        if name.endswith(("q_proj", "down_proj")):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Counted.from_float(module.weight.detach()))
    layers = [m for m in model.modules() if isinstance(m, Counted)]
    with _compat.peft_weight_placeholders(layers, active=True):
        _peft(model)
    assert len(reads) / len(layers) >= 5, \
        f"PEFT reads .weight {len(reads) / len(layers):.1f} times a layer: peft_weight_placeholders may go"
    assert dequantized == [] and not any(m.weight_is_placeholder for m in layers)


# quiet_known_noise: PEFT calls transformers' deprecated is_gradient_checkpointing, and the filter matches it
def test_peft_still_calls_deprecated_is_gradient_checkpointing_and_quiet_known_noise_filters_it(noise_state):
    deprecated = "is_gradient_checkpointing` is deprecated"
    seen = _recorded(lambda: _peft(_micro_llama(quantized=False)))
    assert [w.category for w in seen if deprecated in str(w.message)] == [FutureWarning], \
        "PEFT no longer reads is_gradient_checkpointing: remove its filter from quiet_known_noise"
    warnings.simplefilter("always")
    _compat.quiet_known_noise()
    with warnings.catch_warnings(record=True) as seen:
        _peft(_micro_llama(quantized=False))
    assert not _messages(seen, deprecated)


# quiet_known_noise: torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor, and the filter matches
def test_torch_still_deprecates_into_tensor_collectives_and_quiet_known_noise_filters_them(noise_state):
    import torch.distributed as dist

    assert not dist.is_initialized()  # so each call warns, then fails before communicating

    def call_both():
        for collective in (dist.all_gather_into_tensor, dist.reduce_scatter_tensor):
            with pytest.raises(ValueError, match="process group"):
                collective(torch.zeros(2), torch.zeros(1))

    seen = _recorded(call_both)
    assert len(_messages(seen, "is deprecated")) == 2, \
        "torch no longer deprecates all_gather_into_tensor / reduce_scatter_tensor: drop that filter"
    warnings.simplefilter("always")
    _compat.quiet_known_noise()
    with warnings.catch_warnings(record=True) as seen:
        call_both()
    assert not _messages(seen, "is deprecated")


# quiet_known_noise: bitsandbytes' CPU kernel-hub message comes from the logger we turn down
def test_bitsandbytes_cpu_ops_still_logs_the_kernels_message_and_quiet_known_noise_mutes_its_logger(noise_state):
    from bitsandbytes.backends.cpu import ops

    assert ops.logger.name == "bitsandbytes.backends.cpu.ops"
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in inspect.getsource(ops), \
        "bitsandbytes no longer logs the kernels-community message: drop the logger line from quiet_known_noise"
    ops.logger.setLevel(logging.NOTSET)  # as at import (the CLI tests may have called quiet_known_noise already)
    assert ops.logger.isEnabledFor(logging.WARNING)
    _compat.quiet_known_noise()
    assert not ops.logger.isEnabledFor(logging.WARNING)


# quiet_known_noise: DeepSpeed announces its CPU guess unless DS_ACCELERATOR is set (in a fresh process, which
# guesses once, then again after quiet_known_noise with DeepSpeed's cached choice cleared)
def test_deepspeed_announces_its_cpu_guess_unless_quiet_known_noise_ran_first():
    code = ("from deepspeed.accelerator import real_accelerator as ra; ra.get_accelerator(); "
            "print('--- quieted ---', flush=True); ra.ds_accelerator = None; "
            "from qshard import _compat; _compat.quiet_known_noise(); ra.get_accelerator()")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, text=True, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout
    plain, quieted = proc.stdout.split("--- quieted ---")
    # DeepSpeed only guesses (and says so) without CUDA; that is also the only case quiet_known_noise handles
    assert ("Setting accelerator to CPU" in plain) == (not torch.cuda.is_available()), plain
    assert "Setting accelerator to CPU" not in quieted, quieted


# skip_deepspeed_shm_build: DeepSpeed still probes the shm op, and marking it incompatible stops the build
def test_deepspeed_still_has_the_shm_op_and_skip_deepspeed_shm_build_disables_it():
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    ops = deepspeed.ops.__compatible_ops__
    assert "deepspeed_shm_comm" in ops, "DeepSpeed no longer has the shm op: remove skip_deepspeed_shm_build"
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == "deepspeed_shm_comm"
    before = ops["deepspeed_shm_comm"]
    try:
        _compat.skip_deepspeed_shm_build()
        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
        assert build_shm_op() is None  # what init_distributed calls: no compiler run
    finally:
        ops["deepspeed_shm_comm"] = before


# deepspeed_in_place_unsupported (end to end: tests/test_shardload.py::test_why_not_names_each_reason)
@pytest.mark.parametrize("zero, named", [
    ({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
    ({"mics_shard_size": 2}, "mics_shard_size"),
    ({"zero_quantized_weights": True}, "zero_quantized_weights"),
    ({"zero_quantized_nontrainable_weights": True}, "zero_quantized_nontrainable_weights"),
    ({"offload_param": {"device": "nvme"}}, "offload_param.device=nvme"),
])
def test_deepspeed_in_place_unsupported_names_each_variant(zero, named):
    reason = _compat.deepspeed_in_place_unsupported({"zero_optimization": {"stage": 3, **zero}})
    assert reason is not None and named in reason


def test_deepspeed_in_place_unsupported_accepts_plain_zero3_with_or_without_cpu_offload():
    assert _compat.deepspeed_in_place_unsupported({}) is None
    assert _compat.deepspeed_in_place_unsupported({"zero_optimization": {"stage": 3}}) is None
    assert _compat.deepspeed_in_place_unsupported(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}) is None
    assert _compat.deepspeed_in_place_unsupported(
        {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1, "mics_shard_size": -1}}) is None


# deepspeed_partition_in_place: the DeepSpeed/torch names it relies on (end to end: tests/test_shardload.py)
def test_deepspeed_and_torch_still_have_what_deepspeed_partition_in_place_uses():
    from deepspeed.runtime.zero import partition_parameters as pp

    init_source = inspect.getsource(pp.Init.__init__)
    convert_source = inspect.getsource(pp.Init._convert_to_deepspeed_param)
    expected = {
        "Init._convert_to_deepspeed_param": callable(getattr(pp.Init, "_convert_to_deepspeed_param", None)),
        "Init._partition_world_size": callable(getattr(pp.Init, "_partition_world_size", None)),
        "Init._partition_rank": callable(getattr(pp.Init, "_partition_rank", None)),
        "Init._partition_param (whose layout we copy)": callable(getattr(pp.Init, "_partition_param", None)),
        "Init.__init__ sets self.local_device": "self.local_device =" in init_source,
        "Init.__init__ sets self.remote_device": "self.remote_device =" in init_source,
        "Init.__init__ sets self.pin_memory": "self.pin_memory =" in init_source,
        "_convert_to_deepspeed_param sets param.ds_persist": "param.ds_persist =" in convert_source,
        "_convert_to_deepspeed_param sets param.partition": "param.partition =" in convert_source,
        "PartitionedParamStatus.AVAILABLE": hasattr(pp.PartitionedParamStatus, "AVAILABLE"),
        "torch.utils.swap_tensors": callable(getattr(torch.utils, "swap_tensors", None)),
    }
    missing = [name for name, ok in expected.items() if not ok]
    assert not missing, f"deepspeed_partition_in_place relies on names upstream changed: {missing}"


# deepspeed_prepare_optimizer_state: the DeepSpeed names it relies on (end to end: the zero2/zero3 cases of
# tests/test_faults.py::test_rank_killed_mid_step_restarts_and_resumes_bit_exact)
def test_deepspeed_still_has_what_deepspeed_prepare_optimizer_state_uses():
    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    expected = {
        # looked up with getattr: a rename would silently skip the linking, and resume would fail later
        "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state":
            callable(getattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state", None)),
        "DeepSpeedZeroOptimizer_Stage3 sets self.fp32_partitioned_groups_flat":
            "self.fp32_partitioned_groups_flat =" in inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3),
    }
    missing = [name for name, ok in expected.items() if not ok]
    assert not missing, f"deepspeed_prepare_optimizer_state relies on names upstream changed: {missing}"


# deepspeed_leaf_inputs_require_grad: DeepSpeed 0.19.8 reduces a ZeRO-3 leaf module's gradients from a full backward
# hook, which torch fires before the module's parameter gradients when none of its inputs needs one (end to end: the
# zero3 cells of tests/test_engines.py, whose first decoder layer is such a leaf, equal one process)
def test_deepspeed_reduces_leaf_gradients_from_a_full_backward_hook():
    from deepspeed.runtime.zero import stage3

    source = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3.create_reduce_and_remove_grad_hooks)
    assert "register_full_backward_hook(make_hook(leaf_parameters))" in source


def _weight_grad_ready_when_full_backward_hook_fires(pre_hook) -> list[bool]:
    layer, seen = torch.nn.Linear(4, 4), []
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(module.weight.grad is not None))
    if pre_hook:
        layer.register_forward_pre_hook(pre_hook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Full backward hook is firing when gradients are computed with respect to
        layer(torch.randn(2, 4)).sum().backward()  # module outputs since no inputs require gradients"
    return seen


def test_full_backward_hook_still_fires_before_parameter_grads_when_no_input_needs_one():
    assert _weight_grad_ready_when_full_backward_hook_fires(None) == [False]


def test_deepspeed_leaf_inputs_require_grad_makes_the_hook_fire_after_them_and_leaves_no_grad_mode_alone():
    assert _weight_grad_ready_when_full_backward_hook_fires(_compat.deepspeed_leaf_inputs_require_grad) == [True]
    x, ids = torch.randn(2, 4), torch.arange(3)
    with torch.no_grad():
        assert _compat.deepspeed_leaf_inputs_require_grad(None, (x,)) is None
    needs = torch.randn(2, 4, requires_grad=True)
    out = _compat.deepspeed_leaf_inputs_require_grad(None, (x, ids, needs, None))
    assert out[0].requires_grad and torch.equal(out[0], x) and out[1] is ids and out[2] is needs and out[3] is None


def test_deepspeed_leaf_inputs_require_grad_refuses_a_layer_called_with_keywords_only():
    """torch's full backward hook sees positional inputs only: such a leaf's gradients would be reduced too early."""
    from qshard.errors import QShardError

    with pytest.raises(QShardError, match="Linear is called without a positional floating-point input") as e:
        _compat.deepspeed_leaf_inputs_require_grad(torch.nn.Linear(4, 4), (torch.arange(3),))
    assert "fsdp2" in e.value.fix


# exit_without_teardown: flushes output, exits with the code, skips interpreter teardown (end to end: every
# multi-process run of tests/test_faults.py ends through it, qshard/cli.py)
def test_exit_without_teardown_flushes_output_and_skips_atexit():
    code = ("import atexit, sys; from qshard import _compat; atexit.register(print, 'teardown ran'); "
            "print('out', end=''); print('err', end='', file=sys.stderr); _compat.exit_without_teardown(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")


# fsdp2_allow_integer_parameters: torch 2.11 could not fully_shard a uint8 parameter (pytorch#177844)
def test_nn_parameter_still_refuses_gradients_for_integer_tensors_and_the_replacement_does_not():
    with pytest.raises(RuntimeError, match="dtype can require gradients"):
        torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8))
    p = _compat._IntegerSafeNN("torch.nn").Parameter(torch.zeros(4, dtype=torch.uint8))
    assert isinstance(p, torch.nn.Parameter) and not p.requires_grad
    assert _compat._IntegerSafeNN("torch.nn").Parameter(torch.zeros(4)).requires_grad


def test_fsdp2_integer_fix_is_applied_exactly_on_the_torch_releases_that_need_it():
    """Applied below torch 2.13 (seen needed on 2.11, the GPU image), not from 2.13 (this suite's)."""
    applied = _compat.fsdp2_allow_integer_parameters()
    assert applied is (_compat.release(torch.__version__) < (2, 13))
    assert _compat.release("2.13.0+cpu") == (2, 13) and _compat.release("2.12.0a0+git1234") == (2, 12)


FSDP2_UINT8 = """
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
seen = []
class Coded(torch.nn.Linear):
    def forward(self, x):
        seen.append(self.codes.dtype)
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
    def inner(self, x):
        seen.append(self.codes.dtype)
        return super().forward(x) + self.codes.float().sum()
m = Coded(8, 4)
m.register_parameter("codes", torch.nn.Parameter(torch.arange(32, dtype=torch.uint8).view(4, 8), requires_grad=False))
fully_shard(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
codes = m.codes.full_tensor()
assert codes.dtype == torch.uint8 and torch.equal(codes, torch.arange(32, dtype=torch.uint8).view(4, 8))
assert not m.codes.requires_grad and m.weight.requires_grad
m(torch.ones(2, 8)).sum().backward()
assert m.weight.grad is not None
assert seen == [torch.uint8] * 3, seen  # forward, and the recomputation in backward
print("ok")
"""


def test_forced_fix_keeps_fully_shard_working_on_uint8_and_float_parameters():
    """Both fixes forced (as torch 2.11 gets them) shard a module with uint8 storage under a bf16
    mixed-precision policy: same values, integer parameters frozen and gathered as uint8 (not cast to
    bf16) in forward and in backward, float ones still trainable."""
    proc = _in_one_rank_group("assert _compat.fsdp2_allow_integer_parameters(force=True)\n" + FSDP2_UINT8)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_fully_shard_handles_uint8_parameters_without_the_fix_from_torch_2_13():
    """The upstream half of fsdp2_allow_integer_parameters' version bound: torch >= 2.13 shards and gathers
    uint8 parameters correctly on its own; torch 2.11 failed (2.12 was not seen)."""
    proc = _in_one_rank_group(FSDP2_UINT8)
    if _compat.release(torch.__version__) >= (2, 13):
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", \
            "this torch mishandles integer parameters again: apply fsdp2_allow_integer_parameters to it\n" + \
            proc.stderr[-2000:]
    elif _compat.release(torch.__version__) <= (2, 11):
        assert proc.returncode != 0, "torch <= 2.11 handles integer parameters: lower the fix's version bound"


# fsdp2_root_options: torch's default keeps the root gathered after forward, an explicit True reshards it
def test_fsdp2_root_stays_gathered_after_forward_only_without_an_explicit_true():
    proc = _in_one_rank_group("""
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
def resharded_after_forward(root_options):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8))
    fully_shard(m[1])
    fully_shard(m, **root_options)
    m(torch.tensor([[1, 2]])).sum().detach()
    return isinstance(m[0].weight, DTensor)
print(resharded_after_forward(_compat.fsdp2_root_options(True)), resharded_after_forward({}),
      resharded_after_forward({"reshard_after_forward": True}), resharded_after_forward(_compat.fsdp2_root_options(False)))
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, default, explicit, off = proc.stdout.split()
    assert (ours, default, off) == ("False",) * 3  # qshard's root stays gathered for backward
    assert explicit == "True", "an explicit reshard_after_forward=True no longer reshards the root: " \
                               "fsdp2_root_options may pass it as is"


# torchrun_attempt_store: torch's env:// rendezvous on torchrun's agent store shares keys across restart
# attempts (upstream half); the attempt store does not (our half)
def test_rendezvous_store_is_shared_across_restart_attempts_and_the_attempt_store_is_not(monkeypatch):
    import datetime

    import torch.distributed as dist

    from qshard.runtime import _free_port

    port, timeout = _free_port(), datetime.timedelta(seconds=30)
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)  # torchrun's agent
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)

    def stores(attempt: int):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        return store, _compat.torchrun_attempt_store(0, 1, timeout)

    (torch_0, ours_0), (torch_1, ours_1) = stores(0), stores(1)
    torch_0.set("group/1/address", "dead")
    ours_0.set("group/1/address", "dead")
    assert torch_1.check(["group/1/address"]), \
        "torch's rendezvous now separates restart attempts: torchrun_attempt_store may go"
    assert not ours_1.check(["group/1/address"])
    del server


# install_c10d_kernels / c10d_work_future: the private dispatcher names still work, DDP's reducer (C++) still
# reaches the kernels, a Work still opens to a future, and removing the kernels takes them off
def test_c10d_kernels_see_ddps_reducer_and_come_off_again():
    proc = _in_one_rank_group("""
seen, futures = [], []
def make_kernel(name, op, below):
    def kernel(keyset, *args, **kwargs):
        result = op.redispatch(keyset & below, *args, **kwargs)
        seen.append(name)
        futures.append(_compat.c10d_work_future(result[-1]) is not None)
        return result
    return kernel
lib = _compat.install_c10d_kernels(["allreduce_", "no_such_op_"], make_kernel)
dist.all_reduce(torch.ones(3))
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
ddp(torch.ones(1, 4)).sum().backward()
counted = len(seen)
_compat.remove_c10d_kernels(lib)
dist.all_reduce(torch.ones(3))
print(counted, len(seen), all(futures))
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "2", "True"]  # ours, then DDP's gradient all-reduce; none once removed


def test_deepspeed_cpu_fp16_asks_what_deepspeeds_cpu_accelerator_asks():
    """_compat.deepspeed_cpu_fp16 mirrors DeepSpeed's CPU_Accelerator.is_fp16_supported (0.19.8); when
    DeepSpeed changes its question, this test says so and the workaround can go."""
    import inspect

    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    assert "_is_mkldnn_fp16_supported" in inspect.getsource(CPU_Accelerator.is_fp16_supported)
    assert _compat.deepspeed_cpu_fp16() == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def test_peft_still_refuses_out_proj_of_mamba_models_and_peft_refused_targets_finds_it_first():
    """PEFT 0.21 refuses LoRA on `out_proj` / `conv1d` of Mamba-based models only while wrapping (after the
    base is loaded); qshard asks PEFT's own check up front (all-linear leaves them out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MambaConfig

    model = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=64,
                                                         state_size=4, expand=2))
    with pytest.raises(ValueError, match="incompatible with Mamba"):
        get_peft_model(model, LoraConfig(target_modules=["out_proj", "in_proj"]))
    assert _compat.peft_refused_targets(model, ["in_proj", "x_proj", "out_proj", "backbone.layers.0.mixer.out_proj"]) \
        == ["out_proj", "backbone.layers.0.mixer.out_proj"]
