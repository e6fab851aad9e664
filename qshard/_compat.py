"""Every workaround for a third-party quirk lives here: version range, symptom, removal condition.

Each has a test in tests/test_compat.py that tells us when upstream changed.
"""

from __future__ import annotations

import contextlib
import types
import warnings


@contextlib.contextmanager
def quiet_peft_custom_layer_warning():
    """PEFT (0.12 - at least 0.21) warns "Unsupported layer type ... proceed at your own risk" for every
    layer registered through `LoraConfig._register_custom_module` (its experimental custom-module hook):
    the warning comes from `_get_in_out_features`, which knows only PEFT's own layer types.
    Our quantized layers expose in_features/out_features, which is all PEFT reads. Remove when PEFT stops
    warning for registered custom modules."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*qshard\.quant")
        yield


def quiet_known_noise() -> None:
    """Silence messages that are harmless for qshard and would bury the progress output.

    - bitsandbytes >= 0.49 on CPUs with AVX512-BF16 logs "Failed to load CPU gemm_4bit_forward from
      kernels-community" at import when the optional `kernels` package (a hub download) is absent; it
      only affects bitsandbytes' eval-mode CPU kernel, which qshard's layers do not use.
    - DeepSpeed (0.19) logs "Setting accelerator to CPU ..." at its first `get_accelerator()` when it
      has to guess; setting DS_ACCELERATOR=cpu (no CUDA here) removes the guess.
    - torch 2.13's deprecation of all_gather_into_tensor / reduce_scatter_tensor (see below).
    - PEFT 0.21 calls transformers' deprecated `is_gradient_checkpointing` (FutureWarning in
      transformers 5.x). Remove when PEFT uses `is_activation_checkpointing`.
    """
    import logging
    import os

    import torch

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        # DeepSpeed (imported by transformers/peft when installed) prints "Setting accelerator to
        # CPU" on every import when it has to guess; on a machine without CUDA it is the right guess.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    # torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (used by FSDP2, DeepSpeed and
    # bench-comm) in favour of *_single, which torch 2.6 (our minimum) lacks. Remove with torch >= 2.13.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed (seen in 0.19.8) JIT-compiles its `deepspeed_shm_comm` C++ op in every process's first
    `init_distributed` on CPU (~40 s and up to 2 GB per compiler on 2 cores, then cached), although
    the op serves only `inference_all_reduce`, which training never calls. Marking the op incompatible
    makes DeepSpeed skip the build and fall back to torch.distributed. Remove when DeepSpeed builds it
    lazily. Must run before the first `deepspeed.initialize` / `init_distributed`.
    """
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in ops:
        ops["deepspeed_shm_comm"] = False


def deepspeed_prepare_optimizer_state(zero_optimizer, torch_optimizer) -> None:
    """Make DeepSpeed's ZeRO optimizer accept `safe_set_full_optimizer_state` before its first step.

    DeepSpeed (seen in 0.19.8) lets the wrapped torch AdamW create its state lazily at the first
    step, and ZeRO-1/2 link each parameter's view of that state (`_hp_mapping.optim_fragment`) only
    inside that step; a resumed run writes the state before any step and fails with KeyError
    'exp_avg' (ZeRO-3) or "argument of type 'NoneType' is not iterable" (ZeRO-1/2). We create the
    AdamW state for the flat fp32 partitions DeepSpeed steps (ZeRO-3 keeps them in
    `fp32_partitioned_groups_flat`, ZeRO-1/2 in the param groups) and, for ZeRO-1/2 (ZeRO-3 needs only
    the state), call DeepSpeed's own private linking. Remove when DeepSpeed initialises optimizer state
    eagerly."""
    import torch

    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or \
        [p for group in torch_optimizer.param_groups for p in group["params"]]
    for flat in flats:
        state = torch_optimizer.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat)
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def fsdp2_allow_integer_parameters(force: bool = False) -> bool:
    """Let FSDP2 shard and gather integer parameters (the uint8 storage of qshard's quantized layers) on
    torch releases that mishandle them; returns whether the fixes were applied.

    Seen with torch 2.11.0+cu130 on an H200 (bench/cuda_check.py), both fixed by torch 2.13:
    - FSDPParam creates each sharded parameter as `nn.Parameter(dtensor)` and sets requires_grad only
      afterwards; nn.Parameter defaults to requires_grad=True, which raises "only Tensors of floating
      point dtype can require gradients" for any uint8 parameter, so `fully_shard` failed
      (pytorch/pytorch#177844). Fix: FSDPParam's module gets an `nn` whose Parameter leaves integer
      tensors without gradients (the value the next line sets anyway); every other name is torch.nn's.
    - `FSDPParam.init_dtype_attrs` gives integer parameters the policy's param_dtype (bf16), so they are
      all-gathered as bf16 and bitsandbytes then refused the double-quant scales in backward ("A must be
      uint8, got torch.bfloat16"); torch 2.13 leaves non-floating parameters uncast. Fix: the same clamp
      after the original method.
    Applied where FSDPParam's source lacks torch 2.13's code; `force` applies them regardless (tests).
    Remove when torch >= 2.13 is the minimum."""
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    cls = _fsdp_param.FSDPParam
    creation = force or "requires_grad=param.requires_grad" not in inspect.getsource(cls._init_sharded_param)
    if creation and not isinstance(_fsdp_param.nn, _IntegerSafeNN):
        _fsdp_param.nn = _IntegerSafeNN("torch.nn")
    cast = force or "is_floating_point" not in inspect.getsource(cls.init_dtype_attrs)  # ours has it: once
    if cast:
        original = cls.init_dtype_attrs

        def init_dtype_attrs(self, mp_policy):
            original(self, mp_policy)
            if not self.orig_dtype.is_floating_point:
                self.param_dtype = None

        cls.init_dtype_attrs = init_dtype_attrs
    return creation or cast


class _IntegerSafeNN(types.ModuleType):
    """torch.nn, except that Parameter(integer tensor) does not ask for gradients (see above)."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.nn, name)

    @staticmethod
    def Parameter(data=None, requires_grad: bool = True):  # noqa: N802 (torch's name)
        import torch

        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return torch.nn.Parameter(data, requires_grad)


def exit_without_teardown(code: int) -> None:
    """End a distributed worker once its run has returned and every file is closed, skipping the
    interpreter's teardown. Seen with torch 2.13 + DeepSpeed 0.19.8 on CPU: a ZeRO-3 job restarted by
    torchrun finished training and saving, then a rank aborted at exit ("terminate called without an
    active exception", SIGABRT: a C++ communication thread destroyed while joinable), which turned a
    good run into a failed job (1 of 20 trials of bench/faults.py). Seen too in a single process that
    had run FSDP2 over a one-rank gloo group (CI, tests/test_faults.py, a resume from 2 processes to
    1), so it ends every process that started a process group. Remove when that no longer happens in
    the fault benchmark."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def deepspeed_partition_in_place(init, param, span: tuple[int, int]):
    """Make a ZeRO-3 parameter out of a parameter that is still on the meta device, allocating only this
    rank's partition; returns the view of it that holds elements `span` of the flattened parameter,
    for the loader to fill.

    DeepSpeed (seen in 0.19.8) partitions only tensors that exist whole: `zero.Init(module=...)`
    broadcasts each parameter from rank 0 and copies this rank's part out of it (`_zero_init_param`,
    `_partition_param`), so every rank holds the whole of each parameter for a moment: a whole
    embedding matrix is often the largest tensor of a model. Here DeepSpeed's own
    `_convert_to_deepspeed_param` gives the meta parameter its attributes (it reads only the shape),
    and the partition is laid out as `_partition_param` lays it out (ceil(numel / world) elements,
    rank r's starting at r times that, zero padding at the end of the last); `param.partition()` then
    finds the partition in place and only frees the (empty) data. Not for the ZeRO variants that lay
    partitions out otherwise (`deepspeed_in_place_unsupported`). tests/test_shardload.py compares
    every parameter, gathered by `GatheredParameters`, with the whole load; tests/test_compat.py checks
    that the internals used still exist. Remove when DeepSpeed can partition from a loader."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    init._convert_to_deepspeed_param(param)
    world, rank = init._partition_world_size(param), init._partition_rank(param)
    size = -(-param.ds_numel // world)
    if span != (min(rank * size, param.ds_numel), min(rank * size + size, param.ds_numel)):
        raise RuntimeError(f"DeepSpeed partitions {tuple(param.ds_shape)} differently from {span} on rank {rank}")
    device = init.local_device if param.ds_persist else init.remote_device
    part = torch.zeros(size, dtype=param.dtype, device=device)
    if str(device) == "cpu" and init.pin_memory:
        from deepspeed.accelerator import get_accelerator

        part = get_accelerator().pin_memory(part)
    part.requires_grad = False
    part.ds_numel, part.status, part.final_location = size, PartitionedParamStatus.AVAILABLE, None
    param.ds_tensor, param.ds_numel_aligned = part, size * world
    # off meta, keeping the Python object (modules and tied weights refer to it) and DeepSpeed's
    # attributes: torch refuses `param.data = ` from meta to a real device
    attributes = dict(param.__dict__)
    empty = torch.empty(0, dtype=param.dtype, device=init.local_device)
    torch.utils.swap_tensors(param, torch.nn.Parameter(empty, requires_grad=param.requires_grad))
    param.__dict__.update(attributes)
    param.partition()
    return part[:span[1] - span[0]]


def deepspeed_in_place_unsupported(config: dict) -> str | None:
    """Why `deepspeed_partition_in_place` cannot build this DeepSpeed config's ZeRO-3 partitions (None
    when it can): hpZ and MiCS keep secondary or group-wise partitions, quantized weights and NVMe
    offload keep a partition in another form or place."""
    zero = config.get("zero_optimization") or {}
    used = [key for key in ("zero_hpz_partition_size", "mics_shard_size") if (zero.get(key) or 0) > 1]
    used += [key for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights") if zero.get(key)]
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        used.append("offload_param.device=nvme")
    return f"the DeepSpeed config's {', '.join(used)} lays ZeRO-3 partitions out otherwise" if used else None
