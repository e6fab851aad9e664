"""`qshard doctor [RECIPE]`: what this machine has, what is known to break, and every problem a recipe
would hit, printed together with its fix, before any work starts.

The facts are gathered once into an `Environment` (plain data: versions, GPUs, backends, free disk);
the checks are pure functions of (Environment, Recipe), so tests inject the facts this machine cannot
have (an RTX 2080 Ti, transformers 4.44) and the real run gathers them here.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qshard.errors import QShardError

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "torchao")

NEEDED = {"always": ("torch", "transformers", "peft", "accelerate"), "deepspeed": ("deepspeed",),
          "bitsandbytes": ("bitsandbytes",)}


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int                    # bytes
    capability: tuple[int, int]


@dataclass
class Environment:
    """Everything the checks read about the machine; `gather()` fills it from this one."""

    versions: dict[str, str | None]                 # package -> version, None when not installed
    python: str = ""
    cuda_version: str | None = None                 # torch's CUDA build, None for a CPU build
    gpus: list[GPU] = field(default_factory=list)
    nccl: bool = False
    gloo: bool = True
    bnb_devices: dict[str, str] = field(default_factory=dict)  # device -> "ok" or why 4-bit quantization failed
    free_disk: int | None = None                   # bytes free where the output folder will be
    cpu_half_slowdown: dict[str, float] = field(default_factory=dict)  # "bfloat16" -> x slower than fp32 (CPU only)


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str
    where: str = "environment"
    fatal: bool = True             # False: a warning; the run would still work


# -- gathering the facts from this machine ---------------------------------------------------------

def gather(output_dir: str | None = None) -> Environment:
    import torch

    env = Environment(versions={p: _version(p) for p in PACKAGES}, python=sys.version.split()[0],
                      cuda_version=torch.version.cuda)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env.gpus.append(GPU(props.name, props.total_memory, (props.major, props.minor)))
    env.nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    env.gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available()
    if env.versions["bitsandbytes"]:
        env.bnb_devices = {d: _bnb_works(d) for d in (["cuda"] if env.gpus else []) + ["cpu"]}
    env.free_disk = _free_disk(Path(output_dir or "."))
    if not env.gpus:
        from qshard.precision import half_matmul_slowdown

        env.cpu_half_slowdown = {"bfloat16": half_matmul_slowdown(torch.bfloat16)}  # fp16 on CPU: warned anyway
    return env


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _bnb_works(device: str) -> str:
    """Quantize and dequantize 64 numbers on `device`: the shortest proof that the backend loads."""
    try:
        import bitsandbytes.functional as bnbF
        import torch

        x = torch.linspace(-1, 1, 64, device=device)
        packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        err = (bnbF.dequantize_4bit(packed, state) - x).abs().max().item()
        return "ok" if err < 0.2 else f"wrong results (max error {err:.3f})"
    except Exception as e:  # any failure here is the finding
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _free_disk(path: Path) -> int | None:
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# -- checks ------------------------------------------------------------------------------------------

def parse_version(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '0.12.1.dev0' -> (0, 12, 1)."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def needs(recipe) -> set[str]:
    """What the recipe relies on: "always", "deepspeed", "zero3+4bit", "fsdp2", "bitsandbytes"."""
    if recipe is None:
        return {"always"}
    d, q = recipe.distributed, recipe.quantization.method
    out = {"always"}
    if d.engine == "deepspeed":
        out.add("deepspeed")
        if d.zero_stage == 3 and q in ("nf4", "fp4"):
            out.add("zero3+4bit")
    if d.engine == "fsdp2":
        out.add("fsdp2")
    if q != "none" or recipe.train.optimizer != "adamw":
        out.add("bitsandbytes")
    return out


def check_versions(env: Environment, recipe=None) -> list[Problem]:
    used = needs(recipe)
    problems = []
    for when, packages in NEEDED.items():
        for p in packages:
            if when in used and not env.versions.get(p):
                problems.append(Problem(f"{p} is not installed", f"pip install {p}", where=p))
    for package, minimum in minimum_versions().items():
        have = env.versions.get(package)
        if have and parse_version(have) < parse_version(minimum):
            problems.append(Problem(f"{package} {have} is older than qshard supports (>= {minimum})",
                                    f"pip install '{package}>={minimum}'", where=package))
    return problems


def minimum_versions() -> dict[str, str]:
    """The lower bounds qshard declares for its dependencies (pyproject.toml, as installed): one list
    for pip and for doctor."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        declared = [Requirement(r) for r in requires("qshard") or []]
    except PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    return {r.name: s.version for r in declared for s in r.specifier if s.operator == ">="}


def check_hardware(env: Environment, recipe=None) -> list[Problem]:
    import torch

    from qshard.precision import resolve_precision

    problems = []
    if not env.gpus:
        problems.append(Problem("no CUDA GPU: training runs on the CPU (fine for tests, slow for real models)",
                                "install a CUDA build of torch on a machine with an NVIDIA GPU", fatal=False))
    if recipe is None:
        return problems
    if env.gpus:
        for gpu in env.gpus:
            try:
                resolve_precision(recipe.train.precision, torch.device("cuda", 0), gpu_capability=gpu.capability,
                                  gpu_name=gpu.name)
            except QShardError as e:
                problems.append(Problem(e.what, e.fix or "", where=e.where or "train.precision"))
                break
        if recipe.distributed.engine != "none" and not env.nccl:
            problems.append(Problem("this torch build has no NCCL, which multi-GPU engines use on CUDA",
                                    "install a CUDA build of torch with NCCL", where="distributed.engine"))
    else:
        if recipe.train.precision == "fp16":
            problems.append(Problem("fp16 on the CPU: gradient scaling is meant for GPUs", "use train.precision: "
                                    "auto (fp32 on CPU) or bf16", where="train.precision", fatal=False))
        problems += _slow_half_on_cpu(env, recipe)
    if "bitsandbytes" in needs(recipe) and env.versions.get("bitsandbytes"):
        device = "cuda" if env.gpus else "cpu"
        status = env.bnb_devices.get(device, "not checked")
        if status != "ok":
            problems.append(Problem(f"bitsandbytes cannot quantize on {device}: {status}",
                                    "install a bitsandbytes build for this device (>= 0.45 for CPU support)",
                                    where="quantization.method"))
    return problems


def _slow_half_on_cpu(env: Environment, recipe) -> list[Problem]:
    import torch

    from qshard.precision import cpu_half_warning, resolve_precision
    from qshard.validate import quant_spec

    cpu = torch.device("cpu")
    precision = resolve_precision(recipe.train.precision, cpu)
    slow = cpu_half_warning(cpu, {precision.dtype, quant_spec(recipe, precision).compute_dtype},
                            slowdown=lambda d: env.cpu_half_slowdown.get(str(d).removeprefix("torch."), 1.0))
    return [Problem(*slow, where="train.precision", fatal=False)] if slow else []


def check_recipe(env: Environment, recipe, overwrite: bool = False, resume: str | None = None,
                 recipe_file: str | None = None) -> list[Problem]:
    """Every problem `qshard train` would refuse the recipe for (qshard.validate.check_run, the same
    function), the disk against this environment, and the GPUs' predicted memory."""
    import torch

    from qshard import validate
    from qshard.tools import plan

    device = torch.device("cuda", 0) if env.gpus and torch.cuda.is_available() else torch.device("cpu")
    world = max(1, len(env.gpus)) if recipe.distributed.engine != "none" else 1
    checked = validate.check_run(recipe, validate.Launch(world_size=world, device=device), overwrite=overwrite,
                                 resume=resume, recipe_file=recipe_file, say=lambda *_: None)
    problems = [Problem(e.what, e.fix or "", where=e.where or "recipe") for e in checked.problems]
    if checked.skeleton is not None and checked.targets is not None and env.free_disk is not None:
        need = validate.checkpoint_disk_bytes(checked.skeleton, checked.targets, recipe)
        if env.free_disk < need and not any(p.where == "train.output_dir" for p in problems):
            problems.append(Problem(f"{plan.gib(env.free_disk)} GiB free where {recipe.train.output_dir} goes; the "
                                    f"adapter and {recipe.train.keep_checkpoints} checkpoint(s) need about "
                                    f"{plan.gib(need)} GiB", "free disk space, lower train.keep_checkpoints, or "
                                    "choose another train.output_dir", where="train.output_dir"))
    if env.gpus:
        try:
            problems += _check_gpu_memory(env, recipe, plan.read_model_spec(recipe.model.path))
        except QShardError:
            pass  # the model folder's problem is already listed above
    return problems


def _check_gpu_memory(env: Environment, recipe, spec) -> list[Problem]:
    from qshard.tools import plan

    world = len(env.gpus) if recipe.distributed.engine != "none" else 1
    smallest = min(g.memory for g in env.gpus)
    result = plan.make_plan(recipe, spec, gpus=world, gpu_mem=smallest)
    if result.current.peak <= smallest:
        return []
    fix = "run `qshard plan` for configurations that fit"
    if result.best is not None:
        b = result.best.settings
        fix += f" (e.g. {b.label}, {b.quant}, micro-batch {b.micro_batch}, checkpointing " \
               f"{'on' if b.checkpointing else 'off'}: {plan.gib(result.best.peak)} GiB)"
    return [Problem(f"predicted peak {plan.gib(result.current.peak)} GiB per GPU exceeds the "
                    f"{plan.gib(smallest)} GiB of {env.gpus[0].name}", fix, where="train.micro_batch_size / "
                    "distributed / quantization")]


def diagnose(env: Environment, recipe=None, overwrite: bool = False, resume: str | None = None,
             recipe_file: str | None = None) -> list[Problem]:
    problems = check_versions(env, recipe) + check_hardware(env, recipe)
    if recipe is not None:
        seen = {p.what for p in problems}  # the GPU's precision is checked by both check_hardware and validate
        problems += [p for p in check_recipe(env, recipe, overwrite, resume, recipe_file) if p.what not in seen]
    return problems


# -- the command --------------------------------------------------------------------------------------

def describe(env: Environment) -> str:
    lines = [f"python {env.python}"]
    lines += [f"{p:<13} {env.versions.get(p) or 'not installed'}" for p in PACKAGES]
    lines.append(f"CUDA build    {env.cuda_version or 'none (CPU build of torch)'}; NCCL "
                 f"{'yes' if env.nccl else 'no'}; gloo {'yes' if env.gloo else 'no'}")
    for i, g in enumerate(env.gpus):
        lines.append(f"GPU {i}         {g.name}, {g.memory / 2 ** 30:.1f} GiB, compute capability "
                     f"{g.capability[0]}.{g.capability[1]} (bf16 {'yes' if g.capability >= (8, 0) else 'no: use fp16'})")
    if not env.gpus:
        lines.append("GPU           none")
    for dtype, factor in env.cpu_half_slowdown.items():
        lines.append(f"CPU {dtype:<9} matrix products {factor:.1f}x the time of float32")
    for device, status in env.bnb_devices.items():
        lines.append(f"bitsandbytes  4-bit on {device}: {status}")
    if env.free_disk is not None:
        lines.append(f"free disk     {env.free_disk / 2 ** 30:.1f} GiB")
    return "\n".join(lines)


def format_problems(problems: list[Problem]) -> str:
    if not problems:
        return "no problems found"
    lines = []
    for p in problems:
        lines.append(f"{'ERROR' if p.fatal else 'warning'}: {p.what}\n  where: {p.where}\n  fix:   {p.fix}")
    errors = sum(p.fatal for p in problems)
    lines.append(f"{errors} error(s), {len(problems) - errors} warning(s)")
    return "\n".join(lines)


def main(recipe_path: str | None, overrides: list[str] = (), overwrite: bool = False, resume: str | None = None) -> int:
    """Print the environment and every problem; 1 when something would fail."""
    from qshard.config import load_recipe

    recipe, problems = None, []
    if recipe_path:
        try:
            recipe = load_recipe(recipe_path, list(overrides))
        except QShardError as e:
            problems.append(Problem(e.what, e.fix or "", where=e.where or recipe_path))
    env = gather(recipe.train.output_dir if recipe else None)
    print(describe(env) + "\n")
    problems += diagnose(env, recipe, overwrite=overwrite, resume=resume, recipe_file=recipe_path)
    print(format_problems(problems))
    return 1 if any(p.fatal for p in problems) else 0
