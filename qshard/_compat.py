"""Every workaround for a third-party quirk lives here: version range, symptom, removal condition.

Each has a test in tests/test_compat.py that tells us when upstream changed.
"""

from __future__ import annotations

import contextlib
import types
import warnings


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as torch.__version__ ("2.13.0+cpu", "2.12.0a0+git...")."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# -- PEFT ------------------------------------------------------------------------------------------

def peft_register_custom_layers(config, mapping: dict) -> None:
    """Have PEFT wrap layer types it does not know (qshard's quantized layers) with the given LoRA layer.

    PEFT (0.12 - at least 0.21.2) chooses the LoRA wrapper from a fixed dispatch list (nn.Linear, bnb, GPTQ,
    ...) and raises "Target module ... is not supported" for any other class, even one that exposes
    in_features / out_features; its only way in is `LoraConfig._register_custom_module`, documented as an
    experimental API that may change (docs: developer_guides/custom_models). Remove when PEFT offers a public
    registration (tests/test_compat.py checks the private method is still there and still needed)."""
    config._register_custom_module(mapping)


@contextlib.contextmanager
def peft_weight_placeholders(layers, active: bool):
    """While PEFT attaches adapters, let qshard's quantized layers answer `.weight` with an empty tensor of
    the right device and dtype instead of dequantizing (`weight_is_placeholder`, qshard/quant/base.py).

    PEFT (seen 0.21.2) reads a wrapped layer's `.weight` about 20 times per layer while attaching LoRA, only
    for its device and dtype; dequantizing each time costs seconds on a small model. Not with DoRA
    (`active` False), which needs the dense values. Remove when PEFT reads `.weight` at most once per layer
    (tests/test_compat.py counts the reads)."""
    for layer in layers:
        layer.weight_is_placeholder = active
    try:
        yield
    finally:
        for layer in layers:
            layer.weight_is_placeholder = False


def peft_refused_targets(model, names) -> list[str]:
    """The LoRA target names PEFT refuses for this architecture (PEFT 0.21: `out_proj` and `conv1d` of
    Mamba-based models, `_check_lora_target_modules_mamba`, a private check PEFT runs while wrapping, so the
    refusal would come after loading). Asked of PEFT itself, so a rule PEFT adds or drops is followed;
    without that function (another PEFT), nothing is refused here and PEFT's own check stands."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return []
    config = LoraConfig(target_modules=["_"])
    refused = []
    for name in names:
        try:
            _check_lora_target_modules_mamba(config, model, name.rpartition(".")[2])
        except ValueError:
            refused.append(name)
    return refused


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


# -- messages that bury the progress output --------------------------------------------------------

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


# -- DeepSpeed -------------------------------------------------------------------------------------

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


def deepspeed_leaf_inputs_require_grad(module, args):
    """A forward pre-hook for a ZeRO-3 leaf module (`_z3_leaf`): its floating-point positional inputs that need no
    gradient are replaced by leaves that do.

    DeepSpeed 0.19.8 reduces a leaf module's parameter gradients from a `register_full_backward_hook`
    (stage3.py `create_reduce_and_remove_grad_hooks`). When none of the module's inputs needs a gradient (the
    first decoder layer: the frozen embedding's output), torch fires that hook as soon as the gradients of the
    module's *outputs* exist ("Full backward hook is firing when gradients are computed with respect to module
    outputs since no inputs require gradients"), before its own parameter gradients: DeepSpeed then reduces and
    releases the layer before its backward has run, which stops with "The size of tensor a (0) must match the
    size of tensor b (16)". With an input that needs a gradient the hook fires after the module's backward. No
    gradient path is cut (the input had none); the cost is the input's gradient, one activation. torch's hook sees
    positional inputs only: a module called with its hidden states as a keyword is refused, not trained wrong. Remove
    when DeepSpeed reduces leaf gradients from per-parameter hooks (test: tests/test_compat.py)."""
    import torch

    if not torch.is_grad_enabled():
        return None
    if not any(torch.is_tensor(a) and a.is_floating_point() for a in args):
        from qshard.errors import QShardError

        raise QShardError(f"{type(module).__name__} is called without a positional floating-point input, so "
                          "DeepSpeed ZeRO-3 cannot tell when its backward has run (each decoder layer is a ZeRO-3 "
                          "leaf module)", where="distributed.engine: deepspeed, zero_stage: 3",
                          fix="use distributed.engine: fsdp2 for this architecture")
    return tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() and not a.requires_grad
                 else a for a in args)


def deepspeed_cpu_fp16() -> bool:
    """Whether DeepSpeed will run fp16 on this CPU.

    DeepSpeed 0.19.8's CPU accelerator (`CPU_Accelerator.is_fp16_supported`) asks oneDNN through the
    private `torch.ops.mkldnn._is_mkldnn_fp16_supported()` (x86: AVX512-FP16 or AMX-FP16) and otherwise
    stops inside `deepspeed.initialize`, after the model is loaded, with "Type fp16 is not supported on
    your device." Asking the same question here lets the validator refuse before loading. Remove when
    DeepSpeed exposes the check without importing its accelerator (test: tests/test_compat.py)."""
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(probe()) if probe is not None else False


# -- torch -----------------------------------------------------------------------------------------

def fsdp2_allow_integer_parameters(force: bool = False) -> bool:
    """Let FSDP2 shard and gather integer parameters (the uint8 storage of qshard's quantized layers) on
    torch releases that mishandle them; returns whether the fixes are applied.

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
    Applied on torch < 2.13 (2.12 was not seen either way; both fixes only restate what 2.13 does, so they
    are harmless where torch already behaves); `force` applies them regardless (tests). tests/test_compat.py
    runs fully_shard on uint8 parameters without them, to show where torch needs them. Remove when torch
    >= 2.13 is the minimum."""
    import torch
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    if not force and release(torch.__version__) >= (2, 13):
        return False
    if not isinstance(_fsdp_param.nn, _IntegerSafeNN):
        _fsdp_param.nn = _IntegerSafeNN("torch.nn")
    cls = _fsdp_param.FSDPParam
    if not getattr(cls.init_dtype_attrs, "qshard_integer_safe", False):  # once per process
        original = cls.init_dtype_attrs

        def init_dtype_attrs(self, mp_policy):
            original(self, mp_policy)
            if not self.orig_dtype.is_floating_point:
                self.param_dtype = None

        init_dtype_attrs.qshard_integer_safe = True
        cls.init_dtype_attrs = init_dtype_attrs
    return True


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


def fsdp2_root_options(reshard_after_forward: bool) -> dict:
    """The `reshard_after_forward` argument for `fully_shard` on the root module (embeddings, final norm,
    head), which is used again as soon as backward starts, so it should stay gathered from forward to backward.

    torch's default for the root (the argument left out) does that in every release; an explicit value does
    not mean the same everywhere: torch 2.6 never reshards the root whatever is passed, later releases
    honour an explicit True (pytorch/pytorch#154704: the root is gathered a second time for backward) and read
    the default None as "not the root" (#155319). So for True nothing is passed; False is passed as is.
    tests/test_compat.py checks both behaviours on this torch. Remove when an explicit True keeps the root
    gathered, or qshard wants the root resharded."""
    return {} if reshard_after_forward else {"reshard_after_forward": False}


def torchrun_attempt_store(rank: int, world: int, timeout):
    """The launcher's key-value store, namespaced by restart attempt (TORCHELASTIC_RESTART_COUNT).

    torchrun's agent keeps one TCPStore across restarts (torch 2.x, seen 2.13), while torch's env://
    rendezvous hands it to the workers as is, assuming "a new TCPStore for every retry"
    (torch/distributed/rendezvous.py, _create_c10d_store). Sub-groups that engines create (DeepSpeed's ZeRO
    groups) publish their gloo / NCCL addresses under keys that do not include the attempt, so a restarted
    job read the dead attempt's addresses and failed with "connectFullMesh ... Connection refused"
    (tests/test_faults.py). Remove when the store torch's rendezvous returns is separate per attempt
    (tests/test_compat.py checks whether two attempts still share keys)."""
    import os

    import torch

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=rank == 0 and not agent_hosts_it, timeout=timeout,
                                       wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"qshard/attempt-{attempt}/", store)


def install_c10d_kernels(names, make_kernel):
    """Put a Python kernel in front of each c10d collective op in `names` that this torch has; returns the
    handle `remove_c10d_kernels` takes. `make_kernel(name, op, below)` returns `kernel(keyset, *args,
    **kwargs)`, which must call `op.redispatch(keyset & below, *args, **kwargs)` to reach the backend.

    Torch (2.6 - at least 2.13) has no public way to observe every collective: DDP's reducer issues its
    all-reduce from C++, FSDP2 and DeepSpeed call different Python entry points, and DTensor uses functional
    collectives; all of them end in the dispatcher ops of the `c10d` library. So this registers an
    implementation of torch's own `c10d` ops at the BackendSelect key (which every such call passes; autograd
    wrappers and functional collectives exclude the Autograd key, not this one), using private names:
    `torch._C._dispatch_keyset_full_after`, `torch._C._dispatch_get_all_op_names`, and Library.impl on a
    library torch owns. Remove when torch offers a public per-collective hook on every backend
    (tests/test_compat.py checks that DDP's reducer still reaches the kernels, and that they come off)."""
    import torch

    lib = torch.library.Library("c10d", "IMPL")
    below = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)
    present = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("c10d::")}
    for name in sorted(set(names) & present):
        lib.impl(name, make_kernel(name, getattr(torch.ops.c10d, name).default, below), "BackendSelect",
                 with_keyset=True)
    return lib


def remove_c10d_kernels(lib) -> None:
    """Unregister what `install_c10d_kernels` registered: collectives go straight to their backend again."""
    lib._destroy()


def c10d_work_future(work):
    """The future of a c10d op's Work as the dispatcher returns it (a boxed ScriptObject, opened with the
    private `Work.unbox`), or None where the backend gives none (gloo's reduce-scatter raises)."""
    import torch

    try:
        return torch.distributed.distributed_c10d.Work.unbox(work).get_future()
    except (AttributeError, RuntimeError):
        return None


def release_ddp_reducer(ddp) -> None:
    """Drop a DistributedDataParallel module's C++ Reducer (and the Logger that shares it) while torch still
    holds the process group, so the Reducer is not the group's last owner.

    Seen with torch 2.13 on CPU (gloo): a DDP model freed after destroy_process_group held the group's last
    reference in its Reducer, whose destructor then ran ~ProcessGroupGloo, which joins gloo's worker threads
    with the GIL held, while a worker waited for the GIL to free the tensors of the run's last all_gather:
    the rank hung for ever after a finished run (tests/test_faults.py under torchrun, about 1 in 8 restarted
    DDP jobs; CI). Dropped first, the Reducer only gives up a reference; the group is freed later through
    its own Python binding, which releases the GIL before joining (pytorch#56297). The module is not usable
    for training afterwards. Remove when the Reducer's binding releases the GIL on destruction
    (tests/test_engines.py checks that no DDP module holds a Reducer when the group is destroyed)."""
    ddp.reducer = None
    ddp.logger = None


def exit_without_teardown(code: int) -> None:
    """End a distributed worker once its run has returned and every file is closed, skipping the
    interpreter's teardown. Seen with torch 2.13 + DeepSpeed 0.19.8 on CPU: a ZeRO-3 job restarted by
    torchrun finished training and saving, then a rank aborted at exit ("terminate called without an
    active exception", SIGABRT: a C++ communication thread destroyed while joinable), which turned a
    good run into a failed job (1 of 20 trials of bench/faults.py). Seen too in a single process that
    had run FSDP2 over a one-rank gloo group (CI, tests/test_faults.py, a resume from 2 processes to
    1), and in a 3-rank test worker after destroy_process_group (CI, tests/vocab_worker.py), so it ends
    every process that started a process group, test workers included. Remove when that no longer happens
    in the fault benchmark."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
