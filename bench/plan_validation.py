"""Issue #6's validation: the planner's predicted bytes against measured *allocated tensor bytes* of a real
qshard training step on CPU (single process), per component.

    .venv/bin/python bench/plan_validation.py                 # all cases, ~3 minutes on 2 cores
    .venv/bin/python bench/plan_validation.py --quick         # micro/small models only

How bytes are measured: the CPU allocator keeps no statistics (no max_memory_allocated), and process RSS
counts the allocator's retention, so `LiveTensorBytes` counts tensor storages instead. It is a
TorchDispatchMode: every tensor an op returns inside it has its storage recorded once (views share a
storage) with a weakref callback that subtracts its bytes when the storage is freed; parameters and buffers
that exist before are registered explicitly. Live total and its peak are therefore exactly the bytes of
tensors alive, what `torch.cuda.max_memory_allocated` reports on a GPU minus the caching allocator's
rounding. It sees everything that goes through the dispatcher: the model's ops, autograd's backward ops
(on CPU the engine runs them on the calling thread), the optimizer, bitsandbytes' custom ops.

Each case builds a model with `qshard init-tiny`, loads it with qshard's loader (quantizing on the fly),
attaches LoRA (r=8, all-linear, dropout 0) with qshard.model.lora, and runs two optimizer steps of
`qshard.train.token_loss_sum` + AdamW; the second step (optimizer state present) is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parent.parent
# (model size, quantization, precision, micro-batch, sequence, activation checkpointing)
CASES = [
    ("small", "nf4", "fp32", 2, 128, False),
    ("small", "nf4", "fp32", 4, 256, False),
    ("small", "nf4", "fp32", 4, 256, True),
    ("small", "int8", "fp32", 2, 256, False),
    ("small", "none", "fp32", 2, 256, False),
    ("small", "nf4", "bf16", 4, 256, False),
    ("small", "nf4", "bf16", 4, 256, True),
    ("400m", "nf4", "fp32", 1, 256, False),
    ("400m", "nf4", "bf16", 2, 256, False),
    ("400m", "nf4", "bf16", 2, 256, True),
]
QUICK = [c for c in CASES if c[0] != "400m"]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages (each counted once) and their peak.

    Two ways memory changes without a new tensor coming out of an op, both handled here:
    - a tensor subclass (FSDP2's DTensor) is a wrapper whose bytes live in its local tensor: counted there;
    - `untyped_storage().resize_()` grows or frees a storage in place (FSDP2 allocates and frees its
      unsharded parameters this way); on CPU it bypasses the dispatcher, so while the mode is active
      `UntypedStorage.resize_` is wrapped to report the change.
    """

    def __init__(self):
        super().__init__()
        self.known = WeakIdKeyDictionary()  # storage -> (its weakref, [bytes counted now])
        self.current = self.peak = 0

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(t, "_local_tensor"):  # DTensor
            return self.track(t._local_tensor)
        storage = t.untyped_storage()
        if storage not in self.known:
            self.sync(storage)

    def sync(self, storage) -> None:
        """Count a storage at its current size (new, or resized in place)."""
        cell = self.known[storage][1] if storage in self.known else self._cell(storage)
        self._add(storage.nbytes() - cell[0])
        cell[0] = storage.nbytes()

    def _cell(self, storage) -> list[int]:
        """Register a storage at 0 bytes; its bytes are subtracted when it is freed."""
        cell = [0]
        self.known[storage] = (weakref.ref(storage, lambda _ref, cell=cell: self._freed(cell)), cell)
        return cell

    def _add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def _freed(self, cell: list[int]) -> None:
        self.current -= cell[0]

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self):
        tracker, resize = self, torch.UntypedStorage.resize_

        def counted_resize(storage, size):
            out = resize(storage, size)
            tracker.sync(storage)
            return out

        self._resize = resize
        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def measure(model_dir: Path, quant: str, precision: str, micro_batch: int, seq: int, ckpt: bool) -> dict:
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import attach_lora, resolve_targets
    from qshard.precision import resolve_precision
    from qshard.train import token_loss_sum

    prec = resolve_precision(precision, torch.device("cpu"))
    dtype = "float32" if precision == "fp32" else "bfloat16"
    model = load_model(str(model_dir), dtype=dtype, quant=QuantSpec(method=quant, compute_dtype=prec.dtype))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, targets=resolve_targets(model, "all-linear"),
                        use_dora=False, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (micro_batch, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tracker = LiveTensorBytes()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
    frozen = sum(p.untyped_storage().nbytes() for p in model.parameters() if not p.requires_grad)
    model.train()
    with tracker:
        for _ in range(2):
            tracker.reset_peak()
            with prec.autocast():
                loss = token_loss_sum(model, batch, torch.device("cpu"))
            loss.backward()
            del loss
            grads = sum(p.grad.untyped_storage().nbytes() for p in params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    opt_state = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    lora = sum(p.untyped_storage().nbytes() for p in params)
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    return {"base_weights": frozen, "lora_params": lora, "lora_grads": grads, "optimizer_states": opt_state,
            "buffers": buffers, "peak": tracker.peak,
            "activations_and_logits": tracker.peak - frozen - lora - grads - opt_state - buffers}


def predict(model_dir: Path, quant: str, precision: str, micro_batch: int, seq: int, ckpt: bool) -> dict:
    from qshard.tools import plan

    spec = plan.read_model_spec(str(model_dir))
    s = plan.Settings(quant=quant, dense_dtype="float32" if precision == "fp32" else "bfloat16", precision=precision,
                      lora_r=8, micro_batch=micro_batch, seq_len=seq, checkpointing=ckpt, global_batch=micro_batch)
    e = plan.estimate(spec, s)
    g = e.gpu
    return {"base_weights": g["base_weights"], "lora_params": g["lora_params"], "lora_grads": g["lora_grads"],
            "optimizer_states": g["optimizer_states"], "activations": g["activations"],
            "logits_and_loss": g["logits_and_loss"], "activations_and_logits": g["activations"] + g["logits_and_loss"],
            "peak": e.tensor_bytes}


def pct(predicted: int, measured: int) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| model | quant | precision | mb x seq | ckpt | base MiB (pred / meas) | LoRA+grads+Adam MiB (pred / meas) "
            "| activations+logits MiB (pred / meas) | peak tensors MiB (pred / meas) | peak error |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        states_p = p["lora_params"] + p["lora_grads"] + p["optimizer_states"]
        states_m = m["lora_params"] + m["lora_grads"] + m["optimizer_states"]
        lines.append(f"| {r['size']} | {r['quant']} | {r['precision']} | {r['micro_batch']} x {r['seq']} | "
                     f"{'yes' if r['ckpt'] else 'no'} | {mib(p['base_weights'])} / {mib(m['base_weights'])} | "
                     f"{mib(states_p)} / {mib(states_m)} | {mib(p['activations_and_logits'])} / "
                     f"{mib(m['activations_and_logits'])} ({pct(p['activations_and_logits'], m['activations_and_logits'])}) | "
                     f"{mib(p['peak'])} / {mib(m['peak'])} | {pct(p['peak'], m['peak'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write raw numbers here")
    args = parser.parse_args()
    from qshard import _compat
    from qshard.tools.tiny import init_tiny

    _compat.quiet_known_noise()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for size, quant, precision, mb, seq, ckpt in (QUICK if args.quick else CASES):
            if size not in models:
                models[size] = init_tiny(Path(tmp) / size, size=size)
            case = (models[size], quant, precision, mb, seq, ckpt)
            rows.append({"size": size, "quant": quant, "precision": precision, "micro_batch": mb, "seq": seq,
                         "ckpt": ckpt, "predicted": predict(*case), "measured": measure(*case)})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
