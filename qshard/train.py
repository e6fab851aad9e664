"""`qshard train`: recipe -> validate -> load -> attach LoRA -> engine -> loop -> save.

`run()` is the whole job; `fit()` is the loop, readable in one sitting. The same code runs as one
process or under torchrun / deepspeed / accelerate (each process builds the same global batches from
the seed and takes its own slice of every one).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qshard import compat, data, validate
from qshard.config import Recipe, dump_recipe
from qshard.engines import create_engine
from qshard.errors import QShardError
from qshard.loss import next_token_loss_sum
from qshard.model import shardload, vocab
from qshard.model.load import QuantSpec, load_base_model, release_freed_memory
from qshard.model.lora import (
    adapted_tensors_line,
    attach_lora,
    finish_for_sharing,
    save_adapter,
)
from qshard.observe import faults
from qshard.observe.faults import Watchdog
from qshard.observe.metrics import MetricsLog, memory_all_ranks, truncate_after
from qshard.observe.monitor import (
    GradFlowCheck,
    base_fingerprint,
    check_base_unchanged,
    format_sharding,
    memory_imbalance,
    replicated_tensors,
    sharding_report,
)
from qshard.precision import Precision, cpu_half_warning
from qshard.runtime import Runtime, all_reduce_sum, barrier, init_runtime, shutdown
from qshard.state import checkpoint, rundir
from qshard.state.resume import (
    restore,
    save_checkpoint,
    set_seed,
)
from qshard.validate import quant_spec


@dataclass
class Outcome:
    """What the summary prints and tests assert on."""

    output_dir: Path
    model: object = field(default=None, repr=False)  # the trained PeftModel (engine-wrapped), for callers
    adapter_dir: Path | None = None
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    eval_before: float | None = None
    eval_after: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    memory: dict = field(default_factory=dict)
    sample: str | None = None
    sharding: list[dict] = field(default_factory=list)  # per rank, see monitor.sharding_report
    stopped_by_signal: bool = False
    comm: dict = field(default_factory=dict)  # collectives per step, measured and planned (CommCounter.close)
    process_group: bool = False  # this process ran a torch.distributed group (cli.py ends it without teardown)


def run(recipe: Recipe, *, overwrite: bool = False, resume: str | None = None, recipe_file: str | None = None,
        log=print) -> Outcome:
    """The whole job. Every check that can fail on user input runs before any process group, folder
    change or weight read (qshard/validate.py); only then is the run folder touched, by rank 0."""
    launch = validate.launch_from_env()
    say = log if launch.rank == 0 else (lambda *_: None)
    checked = validate.check_run(recipe, launch, overwrite=overwrite, resume=resume, recipe_file=recipe_file, say=say)
    validate.raise_problems(checked.problems)
    for report in checked.datasets.reports:
        say(report.summary())
    if launch.rank == 0:
        slow = cpu_half_warning(launch.device, {checked.precision.dtype,
                                                quant_spec(recipe, checked.precision).compute_dtype})
        if slow:
            say(f"warning: {slow[0]}; {slow[1]}")
    rt = init_runtime(need_group=recipe.distributed.engine != "none")
    engine = None
    try:
        engine = engine_for(recipe, rt, checked.precision)
        barrier(rt)
        outcome = _start_and_fit(checked, recipe, rt, engine, launch.job, say)
        say(summary(outcome))
        return outcome
    finally:
        if engine is not None:
            engine.close()  # before the group goes: what ties the engine to it (qshard/engines/base.py)
        shutdown(rt)


def _start_and_fit(checked: validate.Checked, recipe: Recipe, rt: Runtime, engine, job: str, say) -> Outcome:
    out_dir = Path(recipe.train.output_dir)
    if rt.is_main:
        if checked.start_fresh:
            rundir.start(out_dir, job)
        else:  # a resumed run becomes this job's: a torchrun restart of it continues it
            rundir.mark(out_dir, job)
        checkpoint.write_text(out_dir / "recipe.yaml", dump_recipe(recipe))  # replaces a link, never writes through
    barrier(rt)

    precision, quant = checked.precision, quant_spec(recipe, checked.precision)
    model = build_model(checked, quant, engine, recipe, rt, say)
    say(_trainable_line(model))
    model, optimizer = engine.wrap(model, lambda params: make_optimizer(params, recipe))
    for line in engine.notes:
        say(line)
    outcome = fit(model, engine, optimizer, checked.datasets, checked.tokenizer, recipe, rt, precision,
                  checked.resume_from, say, engine_key=checked.engine)
    outcome.process_group = rt.distributed
    return outcome


def engine_for(recipe: Recipe, rt: Runtime, precision: Precision):
    """The engine `distributed` names, with the recipe's batch, clipping and engine options."""
    d = recipe.distributed
    return create_engine(d.engine, device=rt.device, precision=precision.name, world_size=rt.world_size,
                         micro_batch=recipe.train.micro_batch_size,
                         accumulation=recipe.train.gradient_accumulation_steps,
                         max_grad_norm=recipe.train.max_grad_norm, zero_stage=d.zero_stage,
                         offload_optimizer=d.offload_optimizer, offload_params=d.offload_params,
                         deepspeed_config=d.deepspeed_config, reshard_after_forward=d.reshard_after_forward,
                         fsdp_cpu_offload=d.fsdp_cpu_offload)


def build_model(checked: validate.Checked, quant: QuantSpec, engine, recipe: Recipe, rt: Runtime, say):
    """The base, loaded sharded where the engine shards parameters (qshard/model/shardload.py), with LoRA."""
    def attach(base):
        if recipe.model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = attach_lora(base, r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                            targets=checked.targets, use_dora=recipe.lora.use_dora, seed=recipe.train.seed,
                            use_rslora=recipe.lora.use_rslora)
        split_vocabulary(model, checked.engine, recipe, rt, say)
        return model

    skeleton, model_dir = checked.skeleton, checked.model_dir
    whole = shardload.why_not(checked.engine, rt.world_size, recipe.lora.use_dora,
                              recipe.distributed.shard_on_load, getattr(engine, "config", None))
    if whole is None:
        say(f"loading the base sharded: each of the {rt.world_size} ranks reads and keeps only its part")
        load = shardload.load_fsdp2 if recipe.distributed.engine == "fsdp2" else shardload.load_zero3
        return load(skeleton, model_dir, engine, attach, recipe.train.seed, rt.rank, rt.world_size, rt.device,
                    quant=quant, log=say)
    if checked.engine in compat.SHARDS_BASE:
        say(f"loading the whole base on every rank before sharding it: {whole}")
    return attach(load_base_model(skeleton, model_dir, quant=quant, device=rt.device, log=say))


def split_vocabulary(model, engine_key: str, recipe: Recipe, rt: Runtime, say) -> None:
    """Vocabulary-parallel embedding and head (qshard/model/vocab.py) where the engine shards parameters."""
    if engine_key not in compat.SHARDS_BASE or rt.world_size < 2:
        return
    why = "distributed.vocab_parallel is false" if not recipe.distributed.vocab_parallel else vocab.why_not(model)
    if why is None:
        vocab.shard(model, rt.rank, rt.world_size, rt.device)
        say(f"embedding and head: vocabulary-parallel, each of the {rt.world_size} ranks keeps 1/{rt.world_size} "
            f"of their rows and neither is ever gathered whole")
    else:
        say(f"embedding and head: gathered by the engine like a layer ({why})")


def fit(model, engine, optimizer, datasets: validate.Datasets, tokenizer, recipe: Recipe, rt: Runtime,
        precision: Precision, resume_from: Path | None, say, engine_key: str) -> Outcome:
    """The training loop: global batches -> this rank's micro-batches -> token-mean loss -> step."""
    from qshard.observe.commcount import comm_record

    tr = recipe.train
    out_dir = Path(tr.output_dir)
    global_batch, steps_per_epoch, total_steps = validate.schedule(len(datasets.train), recipe, rt.world_size)
    scheduler = make_scheduler(optimizer, tr.lr_scheduler, tr.warmup_steps, total_steps)
    pad_id = data.pad_token_id(tokenizer)
    outcome = Outcome(output_dir=out_dir, model=engine.peft_model)
    warnings_log = WarningsLog(out_dir, rt.is_main, say)
    outcome.sharding = report_sharding(engine, engine_key, recipe, rt, warnings_log, say)
    aux_coef = router_aux_coef(engine.peft_model)
    if aux_coef:
        say(f"adding the router's load-balancing loss x {aux_coef} (router_aux_loss_coef), logged as aux_loss")
    trim_heap = tr.trim_heap and rt.device.type == "cpu"
    if trim_heap:
        say("after each optimizer step the freed heap goes back to the OS (glibc malloc_trim; train.trim_heap): "
            "otherwise glibc keeps a step's freed activations resident and the next step grows past them (400M "
            "benchmark, ZeRO-3: -120 to -190 MB peak for 30-90 ms of a 5-8 s step)")
    step = 0
    if resume_from is not None:
        step = restore(resume_from, engine, scheduler, rt, say)
        dropped = truncate_after(out_dir, step) if rt.is_main else 0
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} line(s) that were not records (a write cut short by the kill)")
        say(f"resumed from {resume_from} at step {step}")
    else:
        set_seed(tr.seed)
    if datasets.eval:
        outcome.eval_before = evaluate(model, datasets.eval, pad_id, tr.micro_batch_size, precision, rt)
    grad_flow = GradFlowCheck(rt, every=tr.grad_flow_every, fresh=step == 0)
    planned_comm = _planned_comm(recipe, rt, precision) if rt.distributed else None
    start = time.perf_counter()
    tokens_seen = 0
    mem = ""
    warned_imbalance = False
    batches: dict[int, list[list[int]]] = {}
    # everything the loop leans on is released however it ends, an exception included
    with LoopServices(out_dir, tr, rt, total_steps, step) as services:
        metrics, stop, watchdog, comm, bar = (services.metrics, services.stop, services.watchdog, services.comm,
                                              services.bar)
        while step < total_steps:
            watchdog.arm(step + 1)
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in batches:
                batches = {epoch: data.global_batches(len(datasets.train), global_batch, tr.seed, epoch)}
            examples = [datasets.train[i] for i in batches[epoch][index]]
            # Every rank knows the whole global batch, so the token count that normalises the loss is
            # the same everywhere without communication: the mean over all loss tokens of the step.
            loss_tokens = sum(_loss_tokens(ex) for ex in examples)
            mine = examples[rt.rank * len(examples) // rt.world_size:(rt.rank + 1) * len(examples) // rt.world_size]
            micro_batches = [mine[i:i + tr.micro_batch_size] for i in range(0, len(mine), tr.micro_batch_size)]

            comm.start()
            model.train()
            loss_sum = torch.zeros((), device=rt.device)
            aux_sum = torch.zeros((), device=rt.device)  # router load-balancing loss x loss tokens (MoE)
            for k, micro in enumerate(micro_batches):
                last = k == len(micro_batches) - 1
                with (engine.accumulating() if not last else contextlib.nullcontext()):
                    with precision.autocast():
                        micro_loss, aux = loss_sums(model, data.collate(micro, pad_id), rt.device, aux_coef)
                    if faults.poisoned(step + 1, rt.rank):
                        micro_loss = micro_loss * float("nan")
                    # Engines average gradients over ranks; multiplying by world_size undoes that, so the
                    # gradient is exactly d(global token-mean loss), whatever the number of ranks.
                    engine.backward((micro_loss + aux_coef * aux) * rt.world_size / loss_tokens)
                loss_sum += micro_loss.detach()
                aux_sum += aux.detach()
                # The graph goes now, not when the next forward reassigns micro_loss: custom autograd functions
                # may keep tensors as plain attributes of their context, which backward does not free (bitsandbytes'
                # int8 matmul keeps its weight there; under ZeRO-3 a gathered copy). Before qshard's 4-bit layer
                # stopped doing the same (quant/bnb4bit.py), the finished graph kept the whole gathered base (151 MB
                # on the 400M benchmark) into the next step's forward (BENCHMARKS.md).
                del micro_loss, aux
            faults.point("step", step + 1, rt.rank)
            # One collective, before the optimizer step, for the global loss, "is any rank's loss
            # non-finite" and "did any rank get SIGTERM/SIGINT" (so that every rank stops together).
            flags = torch.tensor([float(not torch.isfinite(loss_sum)), float(stop.requested is not None)],
                                 dtype=torch.float64, device=rt.device)
            with comm.paused():  # the loop's own collective, not the engine's: left out of comm_bytes
                totals = all_reduce_sum(torch.cat([loss_sum.double().reshape(1), flags,
                                                   aux_sum.double().reshape(1)]), rt)
            loss, nonfinite_ranks, stopping = float(totals[0]) / loss_tokens, int(totals[1]), bool(totals[2] > 0)
            if nonfinite_ranks and tr.on_nonfinite == "stop":
                raise nonfinite_error(step + 1, rt.rank, bool(flags[0]), engine.local_grads())
            if nonfinite_ranks:  # on_nonfinite: skip -- drop this step's gradients, keep the data moving
                engine.skip_step()
                scheduler.step()
                step += 1
                warnings_log.warn(step, "skipped", f"step {step} skipped: non-finite loss on {nonfinite_ranks} rank(s)")
                continue
            checking = grad_flow.due(step + 1)
            if checking:
                with comm.paused():  # gathering full gradients (ZeRO) is the check's traffic, not the step's
                    grad_flow.inspect(engine.local_grads(), step + 1)
                base_before = base_fingerprint(model)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            grad_norm = engine.step(tr.max_grad_norm)
            if trim_heap:
                release_freed_memory()
            traffic = comm.stop()
            if checking:
                check_base_unchanged(base_before, base_fingerprint(model), step + 1, rt)
            scheduler.step()
            step += 1

            tokens_seen += sum(len(ex.input_ids) for ex in examples)
            outcome.losses.append(loss)
            elapsed = time.perf_counter() - start
            record = {"step": step, "epoch": epoch, "loss": round(loss, 6), "lr": lr,
                      "grad_norm": round(grad_norm, 6), "tokens": tokens_seen,
                      **({"aux_loss": round(float(totals[3]) / loss_tokens, 6)} if aux_coef else {}),
                      "tokens_per_s": round(tokens_seen / elapsed, 1), "elapsed_s": round(elapsed, 3),
                      **comm_record(traffic, planned_comm)}
            evaluating = bool(tr.eval_every and step % tr.eval_every == 0 and datasets.eval and step < total_steps)
            if evaluating:
                record["eval_loss"] = evaluate(model, datasets.eval, pad_id, tr.micro_batch_size, precision, rt)
            if evaluating or step % tr.log_every == 0 or step == total_steps:
                ranks = memory_all_ranks(rt.device)
                metrics.log({**record, **ranks[0], "rank_memory": ranks})
                imbalance = memory_imbalance(ranks, tr.imbalance_warn)
                if imbalance and not warned_imbalance:
                    warnings_log.warn(step, "imbalance", imbalance)
                    warned_imbalance = True
                mem = f"{max(r.get('gpu_peak_mb', r['rss_mb']) for r in ranks):.0f}MB"
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", mem=mem,
                            **({"comm": f"{traffic.total / 1e6:.2f}MB"} if traffic else {}))
            bar.update(1)
            if (tr.save_every and step % tr.save_every == 0) or stopping or step == total_steps:
                save_checkpoint(out_dir, step, epoch, index + 1, global_batch, engine, scheduler, recipe, rt,
                                protect=resume_from)
            if stopping:
                say(f"\nstopped by {stop.requested or 'a signal to another rank'} after step {step}; checkpoint saved. "
                    f"Resume with the same command plus --resume auto")
                outcome.stopped_by_signal = True
                break
        outcome.comm = comm.close(planned_comm)

    outcome.steps, outcome.tokens = step, tokens_seen
    outcome.seconds = time.perf_counter() - start
    if datasets.eval:
        outcome.eval_after = evaluate(model, datasets.eval, pad_id, tr.micro_batch_size, precision, rt)
    outcome.adapter_dir = out_dir / "adapter"
    state = engine.adapter_state_dict()
    if rt.is_main:
        save_adapter(outcome.adapter_dir, state, engine.peft_model)
        finish_for_sharing(outcome.adapter_dir, tokenizer, model_card(recipe, outcome))
    outcome.memory = memory_all_ranks(rt.device)[0]
    if tr.sample_tokens:
        outcome.sample = generate_sample(engine.peft_model, tokenizer, tr.sample_prompt, datasets, precision,
                                         rt.device, tr.sample_tokens)
    return outcome


# -- pieces of the loop ----------------------------------------------------------------------------

class LoopServices:
    """What the loop leans on and must release however it ends, an exception included: the metrics
    writers, the SIGTERM/SIGINT handlers, the watchdog's timer (which would otherwise end the process
    with os._exit long after the run), the collective counter's hooks and the progress bar."""

    def __init__(self, out_dir: Path, tr, rt: Runtime, total_steps: int, step: int):
        self.out_dir, self.tr, self.rt, self.total_steps, self.step = out_dir, tr, rt, total_steps, step
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "LoopServices":
        from tqdm import tqdm

        from qshard.observe.commcount import CommCounter

        tr, rt, stack = self.tr, self.rt, self._stack
        with stack:  # a failure while opening them releases the ones already open
            self.metrics = MetricsLog(self.out_dir, enabled=rt.is_main)
            stack.callback(self.metrics.close)
            self.stop = _StopFlag()
            stack.callback(self.stop.restore)
            self.watchdog = Watchdog(tr.watchdog_s, rt.rank)
            stack.callback(self.watchdog.disarm)
            self.comm = CommCounter(enabled=rt.distributed and tr.count_comm)  # the engine's collectives per step
            stack.callback(self.comm.close)
            self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not rt.is_main, unit="step",
                            dynamic_ncols=True)
            stack.callback(self.bar.close)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def report_sharding(engine, engine_key: str, recipe: Recipe, rt: Runtime, warnings_log: "WarningsLog",
                    say) -> list[dict]:
    """What each rank holds (sharding.json, printed), and a warning for large tensors held whole under
    an engine that shards the base (`engine_key`: validate's engine identity)."""
    rows = sharding_report(engine.peft_model, rt)
    say(format_sharding(rows))
    if rt.is_main:
        checkpoint.write_json(Path(recipe.train.output_dir) / "sharding.json", rows)
    if engine_key in compat.SHARDS_BASE:
        whole = replicated_tensors(engine.peft_model, rt)
        if whole:
            warnings_log.warn(0, "replicated", f"{len(whole)} large frozen tensor(s) are held whole on rank "
                              f"{rt.rank} although {engine_key} shards the base: {', '.join(whole[:4])}")
    return rows


def _planned_comm(recipe: Recipe, rt: Runtime, precision: Precision) -> dict[str, int] | None:
    """The planner's bytes per step and kind for this run, or None where it cannot read the model's shapes."""
    from qshard.observe.commcount import planned_step_bytes

    try:
        return planned_step_bytes(recipe, rt.world_size, precision.name)
    except QShardError:  # a config.json the planner does not understand: measure without a plan
        return None


def token_loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled tokens, computed in fp32."""
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # input_ids, attention_mask (+ position_ids)
    return _forward_and_loss(model, inputs, batch["labels"])[0]


def _forward_and_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, **options):
    """(next-token loss sum, the model's output). The logits go straight to the chunked loss, which upcasts
    one chunk at a time and overwrites them with their gradient in backward (qshard/loss.py): no full fp32
    copy. A vocabulary-parallel head hands over its slice of every rank's logits instead (qshard/model/vocab.py)."""
    head = vocab.head_of(model)
    with vocab.logits_for_loss(head):
        out = model(**inputs, use_cache=False, **options)
        return (next_token_loss_sum(out.logits, labels) if head is None else head.loss_sum(out.logits, labels)), out


def router_aux_coef(peft_model) -> float:
    """The weight of a Mixture-of-Experts model's router load-balancing loss (config.json's
    `router_aux_loss_coef`), for a model whose forward computes it on request (`output_router_logits`);
    0 for any other model."""
    base = peft_model.get_base_model()
    config = base.config.get_text_config()
    if not hasattr(config, "output_router_logits"):
        return 0.0
    # transformers records router logits from the modules of one class (`_can_record_outputs`); a model
    # built without them (DeepSeek-V4 with hash routing only) would fail in its own loss function
    recorder = (getattr(type(base), "_can_record_outputs", None) or {}).get("router_logits")
    target = getattr(recorder, "target_class", recorder)
    if not isinstance(target, type) or not any(isinstance(m, target) for m in base.modules()):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def loss_sums(model, batch: dict[str, torch.Tensor], device: torch.device,
              aux_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_loss_sum, the router's load-balancing loss x this micro-batch's loss tokens). The second is
    transformers' own (the model's `load_balancing_loss_func`, via `output_router_logits`), weighted by
    tokens so that the step adds aux_coef x the token-weighted mean over micro-batches: with one micro-batch,
    exactly what the model's forward adds to its loss. Zero without a router loss."""
    if not aux_coef:
        return token_loss_sum(model, batch, device), torch.zeros((), device=device)
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss, out = _forward_and_loss(model, inputs, batch["labels"], output_router_logits=True)
    tokens = (batch["labels"][:, 1:] != data.IGNORE).sum()
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)  # no router ran
    return loss, aux.float() * tokens


def nonfinite_error(step: int, rank: int, mine: bool, grads: dict) -> QShardError:
    """Name the step, whether this rank's loss was non-finite, and the first module whose gradient is."""
    bad = next((name for name, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())), None)
    where = f"rank {rank}: " + ("its own loss is non-finite" if mine else "its loss is finite (another rank's is not)")
    where += f"; first non-finite gradient: {bad}" if bad else "; its gradients are finite"
    return QShardError(f"non-finite loss at step {step}", where=where,
                       fix="lower train.learning_rate, set train.max_grad_norm, or use precision bf16/fp32 instead "
                           "of fp16; check the data around this step")


def _loss_tokens(example: data.Example) -> int:
    return sum(1 for label in example.labels[1:] if label != data.IGNORE)


@torch.no_grad()
def evaluate(model, examples: list[data.Example], pad_id: int, micro_batch: int, precision: Precision,
             rt: Runtime) -> float:
    """Token-mean loss over the eval set; each rank takes every world_size-th example."""
    model.eval()
    mine = examples[rt.rank::rt.world_size]
    total = torch.zeros(2, device=rt.device, dtype=torch.float64)
    # Every rank runs as many forwards (the engines' gathers and a vocabulary-parallel head pair them up
    # across ranks): a rank with fewer examples runs a last one with no labelled token.
    blank = data.Example(examples[0].input_ids, [data.IGNORE] * len(examples[0].input_ids))
    for i in range(0, -(-len(examples) // rt.world_size), micro_batch):
        chunk = mine[i:i + micro_batch] or [blank]
        with precision.autocast():
            total[0] += token_loss_sum(model, data.collate(chunk, pad_id), rt.device).double()
        total[1] += sum(_loss_tokens(ex) for ex in chunk)
    total = all_reduce_sum(total, rt)
    model.train()
    return float(total[0] / total[1])


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    tr = recipe.train
    if tr.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[tr.optimizer]
    return cls(params, lr=tr.learning_rate, weight_decay=tr.weight_decay)


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then cosine/linear decay to 0 at `total` (or constant)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- set-up ----------------------------------------------------------------------------------------

def _trainable_line(model) -> str:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3: whole
    return f"LoRA: {trainable:,} trainable parameters. {adapted_tensors_line(model)}"


# -- the end of a run ------------------------------------------------------------------------------

@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str | None, datasets: validate.Datasets, precision: Precision,
                    device: torch.device, max_new_tokens: int) -> str:
    """Greedy continuation of a chat prompt, so the user sees what the adapter learned."""
    prompt = prompt or tokenizer.decode(_prompt_part(datasets.train[0]), skip_special_tokens=False)
    if tokenizer.chat_template and not prompt.startswith(tuple(tokenizer.all_special_tokens)):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    model.eval()
    with precision.autocast():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=data.pad_token_id(tokenizer))
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _prompt_part(example: data.Example) -> list[int]:
    first_target = next(i for i, label in enumerate(example.labels) if label != data.IGNORE)
    return example.input_ids[:first_target]


def model_card(recipe: Recipe, o: Outcome) -> str:
    """README.md of the final adapter folder: what it is, what made it, how to load it."""
    from qshard.config import dump_recipe

    base = str(Path(recipe.model.path).expanduser().resolve()) if Path(recipe.model.path).expanduser().exists() \
        else recipe.model.path
    losses = f"{o.losses[0]:.4f} (first step) -> {o.losses[-1]:.4f} (last step)" if o.losses else "no step ran"
    evals = f"\n- eval loss: {o.eval_before:.4f} -> {o.eval_after:.4f}" if o.eval_after is not None else ""
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, qshard]
---
# LoRA adapter for {Path(base).name}

Trained by qshard on `{recipe.data.path}` ({o.steps} steps, {o.tokens:,} tokens), base quantized as
`{recipe.quantization.method}`, engine `{recipe.distributed.engine}`.

- train loss: {losses}{evals}

## Load it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```

## Recipe

```yaml
{dump_recipe(recipe).rstrip()}
```
"""


def summary(o: Outcome) -> str:
    lines = [f"\ntrained {o.steps} steps, {o.tokens:,} tokens in {o.seconds:.1f} s "
             f"({o.tokens / max(o.seconds, 1e-9):,.0f} tokens/s)"]
    if o.losses:
        lines.append(f"train loss: {o.losses[0]:.4f} (first step) -> {o.losses[-1]:.4f} (last step)")
    if o.eval_before is not None:
        lines.append(f"eval loss:  {o.eval_before:.4f} (before) -> {o.eval_after:.4f} (after)")
    peak = o.memory.get("gpu_peak_mb") or o.memory.get("peak_rss_mb")
    lines.append(f"peak memory: {peak:,.0f} MB ({'GPU allocated' if 'gpu_peak_mb' in o.memory else 'CPU resident'})")
    if o.comm:
        from qshard.observe.commcount import format_comm

        lines.append(format_comm(o.comm))
    lines.append(f"adapter: {o.adapter_dir}  (PEFT format; PeftModel.from_pretrained(base, path))")
    if o.sample is not None:
        lines.append(f"sample:\n{o.sample}")
    return "\n".join(lines)


class WarningsLog:
    """Warnings go to the console and, one JSON object per line, to <run>/warnings.jsonl (qshard report)."""

    def __init__(self, out_dir: Path, enabled: bool, say):
        self.path, self.enabled, self.say = out_dir / "warnings.jsonl", enabled, say

    def warn(self, step: int, kind: str, message: str) -> None:
        import json

        self.say(f"warning: {message}")
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "kind": kind, "message": message}) + "\n")


class _StopFlag:
    """SIGTERM/SIGINT ask for one last checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
