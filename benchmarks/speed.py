"""Throughput of DiCo against DiT on the current device: forward and training step, fp32/bf16, eager/compiled.

One table: for each size (S, B, L, XL) and setting, images/s of DiT and of DiCo side by side, their ratio and the
paper's ratio (Table 1: A100, fp32, batch 64, forward), the peak memory of a training step, optionally the published
DiCo implementation run beside ours (``--published-dico PATH``: your clone of shallowdream204/DiCo), optionally the
DiT and DiCo of another checkout of this repository (``--baseline-tree PATH``: e.g. the tree before a change, timed
in the same turns, so that a refactor's speed is compared side by side), and optionally the cost of guided sampling
against bare model calls (``--sampling``).

A training step is: forward + hybrid diffusion loss (``create_diffusion("").training_losses``) + backward + AdamW.
The models of one row are timed in turns (A, B, A, B, ...) after a warm-up; images/s are from the median time, and
a ratio is the median over turns of the two models' time ratio within a turn, so that noise (other jobs on the
machine, clock changes) that comes and goes hits both sides of each ratio alike.

Examples::

    python benchmarks/speed.py --models S --quick                 # a few minutes on a laptop CPU
    python benchmarks/speed.py --models S --batch-forward 64 --batch-train 32 --reps 7 --cpu-env tuned
    python benchmarks/speed.py --dtypes fp32 bf16 --compile both  # the full table (meant for a GPU)
    git worktree add ../before HEAD~1 && python benchmarks/speed.py --models S --baseline-tree ../before

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "S": ("DiT-S/2", "DiCo-S"),
    "B": ("DiT-B/2", "DiCo-B"),
    "L": ("DiT-L/2", "DiCo-L"),
    "XL": ("DiT-XL/2", "DiCo-XL"),
}
PUBLISHED_BUILDERS = {"DiCo-S": "DiCo_S", "DiCo-B": "DiCo_B", "DiCo-L": "DiCo_L", "DiCo-XL": "DiCo_XL"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["S", "B", "L", "XL"], choices=list(SIZES), help="sizes to compare")
    p.add_argument(
        "--modes",
        nargs="*",
        default=["forward", "train"],
        choices=["forward", "train"],
        help="table rows to time (none: only --sampling)",
    )
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="bf16 = bf16 autocast")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile the models")
    p.add_argument("--batch-forward", type=int, default=64, help="forward batch (the paper's: 64)")
    p.add_argument("--batch-train", type=int, default=32, help="training-step batch")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per model (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model first (compilation happens here)")
    p.add_argument("--quick", action="store_true", help="a short run: 3 reps, 1 warm-up, batches 32 / 16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--image-size", type=int, default=256, help="image resolution (latent = size / 8)")
    p.add_argument("--published-dico", metavar="PATH", help="a clone of shallowdream204/DiCo: time its dico_models too")
    p.add_argument(
        "--baseline-tree",
        metavar="PATH",
        help="another checkout of this repository: time its DiT and DiCo in the same turns (before/after a change)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--sampling", action="store_true", help="also time guided sampling against bare model calls")
    p.add_argument("--sample-steps", type=int, default=250, help="sampling steps (iDDPM, respaced)")
    p.add_argument("--sample-batch", type=int, default=16, help="samples per sampling run (the model sees twice that)")
    p.add_argument("--sample-reps", type=int, default=2, help="sampling runs of each kind (median reported)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument(
        "--tf32",
        default="default",
        choices=["default", "on", "off"],
        help="CUDA TF32: PyTorch's defaults (matmul off, cuDNN conv on), or all on / all off",
    )
    p.add_argument(
        "--cpu-env",
        default="default",
        choices=["default", "tuned"],
        help="tuned: OMP_WAIT_POLICY=PASSIVE and glibc malloc without mmap/trim (set before torch loads)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: CPU seconds of this process instead of wall time; on a shared, loaded CPU with --threads 1 it\n"
        "measures the work done rather than the share of the machine the run got",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one training step of DiT and DiCo of each\n"
        "size (--batch-train, first of --dtypes; torch.profiler): time by group of operations",
    )
    p.add_argument("--time-budget", type=float, help="seconds; rows that would start later are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        metavar="PATH",
        help="also write every measurement as JSON lines (the first: the run's "
        "settings), each row when it is measured (a run cut short keeps them)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 3), min(args.warmup, 1)
        args.batch_forward, args.batch_train = min(args.batch_forward, 32), min(args.batch_train, 16)
    return args


def tune_cpu_env() -> dict[str, str]:
    """Environment tuning for CPU runs; must run before torch (its OpenMP runtime) is loaded.

    - ``OMP_WAIT_POLICY=PASSIVE``: on a loaded machine, spinning OpenMP workers cost a scheduler slice (milliseconds)
      at each parallel region; many mid-sized ops then take several times longer.
    - glibc malloc without mmap and without trimming: every large tensor otherwise is a fresh mmap, paid for with a
      page fault per 4 KiB page at first touch (the usual advice is jemalloc/tcmalloc; this needs no install).
    """
    done = {"OMP_WAIT_POLICY": os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")}
    if "torch" in sys.modules:
        done["warning"] = "torch was already imported: OMP_WAIT_POLICY may not apply"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 40):
            done["malloc"] = "mmap_max=0, trim_threshold=1TiB"
    except OSError:  # not glibc
        done["malloc"] = "unchanged (no glibc)"
    return done


# --------------------------------------------------------------------------------------------- measurement helpers
class Device:
    """Synchronisation, memory and naming for one torch device."""

    def __init__(self, torch: Any, spec: str) -> None:
        self.torch = torch
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(spec)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def name(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        model = platform.processor() or "CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"{model}, {os.cpu_count()} logical CPUs, {self.torch.get_num_threads()} torch threads"

    def peak_memory(self, fn: Callable[[], None]) -> float | None:
        """MiB that one call of ``fn`` needs above what is resident before it (the training step's activations,
        gradients and temporaries; parameters and optimizer state are resident already).

        CUDA: the allocator's peak. CPU (Linux): the peak resident set size (VmHWM) reset just before the call, after
        returning free heap memory to the system, minus the resident size then.
        """
        torch = self.torch
        gc.collect()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        status = Path("/proc/self/status")
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return None

        def field(name: str) -> int:
            for line in status.read_text().splitlines():
                if line.startswith(name):
                    return int(line.split()[1])  # kB
            raise KeyError(name)

        before = field("VmRSS:")
        fn()
        return (field("VmHWM:") - before) / 1024


def timed_in_turns(
    fns: dict[str, Callable[[], None]],
    reps: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turns (one rep of each, then the next rep)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[k].append(clock() - t0)
    return times


def paired_speedup(base: list[float], new: list[float]) -> float:
    """How many times faster ``new`` runs than ``base``: the median over turns of base / new time."""
    return statistics.median(b / n for b, n in zip(base, new, strict=True))


# --------------------------------------------------------------------------------------------- the profile
#: The groups a training step's time is split into (``--profile``); "idle gaps" is the step's wall time outside
#: every operation's own time: between kernels on a GPU (launch latency, host work, synchronisation), Python and
#: dispatch on a CPU.
GROUPS = (
    "matrix products",
    "conv pointwise (1x1)",
    "conv depthwise",
    "conv other",
    "attention",
    "norms",
    "elementwise",
    "optimizer",
    "idle gaps",
)
AUTOGRAD_NODE = "autograd::engine::evaluate_function: "
POINTWISE = "speed.py: 1x1 conv"  # the profiler range around each 1x1 convolution module's forward (DiCo's run as
# matrix products over channels-last maps, like DiT's linear layers: only the module tells them apart)


def _chain(event: Any) -> list[Any]:
    """``event`` and its enclosing operations, innermost first."""
    out = []
    while event is not None:
        out.append(event)
        event = event.cpu_parent
    return out


def _group(chain: list[Any]) -> str:
    """The group of an operation from its forward context (the op and the ops enclosing it, innermost first)."""
    names = [e.name for e in chain]
    if any(n.startswith("Optimizer.") for n in names):  # record_function ranges of step and zero_grad
        return "optimizer"
    if any("scaled_dot_product" in n or "_attention" in n for n in names):
        return "attention"
    if any("norm" in n for n in names):  # layer_norm, group_norm, batch_norm, rms_norm, their inner ops
        return "norms"
    if POINTWISE in names:
        return "conv pointwise (1x1)"
    for e in chain:
        shapes = e.input_shapes or []
        if "conv" in e.name and len(shapes) > 1 and len(shapes[1]) == 4:  # (input, weight [Co, Ci/groups, kh, kw])
            _, per_group, kh, kw = shapes[1]
            return "conv pointwise (1x1)" if kh == kw == 1 else "conv depthwise" if per_group == 1 else "conv other"
    products = [
        e
        for e in chain
        if e.name in ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    ]
    if products:
        outer = products[-1]
        shapes = outer.input_shapes or [[]]
        if outer.name != "aten::linear" and len(shapes) > 1 and len(shapes[1]) >= 3:  # two activations' product:
            return "attention"  # attention's scores or values
        return "matrix products"
    return "elementwise"


def step_groups(events: Any, wall_us: float, cuda: bool) -> dict[str, float]:
    """Milliseconds of one profiled step by group. Each operation's own time (device time of the kernels it
    launched on CUDA, CPU time otherwise) goes to the group of its forward context: a backward operation is
    attributed through its autograd node's sequence number to the forward operation that made the node."""
    forward: dict[int, list[Any]] = {}  # sequence number -> the deepest forward op chain that recorded it
    for e in events:
        chain = _chain(e)
        backward = any(a.name.startswith(AUTOGRAD_NODE) for a in chain)
        if e.sequence_nr >= 0 and not backward and len(chain) > len(forward.get(e.sequence_nr, [])):
            forward[e.sequence_nr] = chain
    ms = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        if e.is_user_annotation or (cuda and e.device_type.name != "CPU"):
            continue
        own = e.self_device_time_total if cuda else e.self_cpu_time_total
        if own <= 0:
            continue
        chain = _chain(e)
        node = next((a for a in chain if a.name.startswith(AUTOGRAD_NODE)), None)
        context = forward.get(node.sequence_nr, chain) if node is not None else chain
        ms[_group(context)] += own / 1000
    ms["idle gaps"] = max(0.0, wall_us / 1000 - sum(ms.values()))
    return ms


def profile_step(torch: Any, fn: Callable[[], None], dev: Any, model: Any) -> dict[str, Any]:
    """One call of ``fn`` (a training step of ``model``, warmed up) under ``torch.profiler``: its wall time and
    groups; the forward of each 1x1 convolution module of ``model`` inside a :data:`POINTWISE` range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    ranges: dict[int, Any] = {}

    def enter(module: Any, inputs: Any) -> None:
        ranges[id(module)] = record_function(POINTWISE).__enter__()

    def leave(module: Any, inputs: Any, output: Any) -> None:
        ranges.pop(id(module)).__exit__(None, None, None)

    pointwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    hooks = [h for m in pointwise for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    dev.sync()
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            start = time.perf_counter()
            fn()
            dev.sync()
            wall_us = (time.perf_counter() - start) * 1e6
    finally:
        for h in hooks:
            h.remove()
    return {"step_ms": wall_us / 1000, "groups_ms": step_groups(prof.events(), wall_us, dev.cuda)}


def print_profile(p: dict[str, Any]) -> None:
    """Both models' step by group, and the bound each group implies: the step without it (Amdahl)."""
    dit, dico = SIZES[p["size"]]
    a, b = p[dit], p[dico]
    print(
        f"\nprofile of one training step, {p['size']}, {p['dtype']}, batch {p['batch']} ({p['device']}): {dit} "
        f"{a['step_ms']:.1f} ms, {dico} {b['step_ms']:.1f} ms (DiCo/DiT speed {a['step_ms'] / b['step_ms']:.2f}x)"
    )
    print(
        f"| group | {dit} ms | % | {dico} ms | % | DiCo - DiT ms | bound: {dico} without it | "
        f"DiCo/DiT if DiCo's took DiT's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for g in GROUPS:
        ta, tb = a["groups_ms"][g], b["groups_ms"][g]
        rest = b["step_ms"] - tb
        bound = f"{b['step_ms'] / rest:.2f}x faster" if rest > 0 else "-"
        closed = a["step_ms"] / (rest + ta) if rest + ta > 0 else float("nan")
        print(
            f"| {g} | {ta:.2f} | {100 * ta / a['step_ms']:.1f} | {tb:.2f} | {100 * tb / b['step_ms']:.1f} | "
            f"{tb - ta:+.2f} | {bound} | {closed:.2f}x |",
            flush=True,
        )
    print(
        "# own time of each operation by forward context (backward ops through their autograd node); matrix "
        "products: linear layers (1x1 conv modules, DiCo's run as matrix products too, count as conv pointwise); "
        "idle gaps: the step's wall time outside all of them; bound: the step if the group cost nothing"
    )


# --------------------------------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch, self.args = torch, args
        self.dev = Device(torch, args.device)
        self.latent = args.image_size // 8
        self.results: list[dict[str, Any]] = []
        self._saved = False  # the --json file started (its settings line written)
        self.start = time.perf_counter()
        self.published = self._import_published(args.published_dico)
        self.baseline = self._import_tree(args.baseline_tree)
        from dico.diffusion import create_diffusion

        self.diffusion = create_diffusion("")
        self.paper = self._paper_throughputs()

    # ---- setup
    @staticmethod
    def _import_published(path: str | None) -> Any:
        if not path:
            return None
        folder = Path(path).expanduser().resolve()
        if not (folder / "dico_models.py").exists():
            raise SystemExit(f"--published-dico: no dico_models.py in {folder}")
        sys.path.insert(0, str(folder))
        import dico_models  # the user's own clone of the published code

        return dico_models

    @staticmethod
    def _import_tree(path: str | None) -> Any:
        """``dico.models`` of another checkout, imported as ``dico_baseline.models`` beside this tree's ``dico``."""
        if not path:
            return None
        import importlib
        import importlib.util

        package = Path(path).expanduser().resolve() / "dico"
        if not (package / "models").is_dir():
            raise SystemExit(f"--baseline-tree: no dico/models in {package.parent}")
        spec = importlib.util.spec_from_file_location(
            "dico_baseline", package / "__init__.py", submodule_search_locations=[str(package)]
        )
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["dico_baseline"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return importlib.import_module("dico_baseline.models")

    @staticmethod
    def _paper_throughputs() -> dict[str, float]:
        from importlib import resources

        tables = json.loads(resources.files("dico").joinpath("reference/paper_tables.json").read_text())
        return {row["model"]: row["throughput"] for row in tables["table1_imagenet256_400k_no_cfg"]}

    def build(self, name: str) -> Any:
        torch = self.torch
        torch.manual_seed(self.args.seed)
        with torch.device(self.dev.device):  # initialise in place (fast on a GPU)
            if name.startswith("published "):
                model = getattr(self.published, PUBLISHED_BUILDERS[name.split(" ", 1)[1]])()
            elif name.startswith("baseline "):
                model = self.baseline.create_model(name.split(" ", 1)[1], input_size=self.latent)
            else:
                from dico.models import create_model

                model = create_model(name, input_size=self.latent)
        # Non-zero adaLN and head weights, as in a trained model (zero ones would let kernels skip work).
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.abs().max() == 0:
                    p.normal_(0, 0.02)
        return model.to(self.dev.device)

    def inputs(self, batch: int) -> tuple[Any, Any, Any]:
        torch, d = self.torch, self.dev.device
        g = torch.Generator().manual_seed(self.args.seed)
        x = torch.randn(batch, 4, self.latent, self.latent, generator=g).to(d)
        t = torch.randint(0, 1000, (batch,), generator=g).to(d)
        y = torch.randint(0, 1000, (batch,), generator=g).to(d)
        return x, t, y

    def autocast(self, dtype: str) -> Any:
        torch = self.torch
        if dtype == "bf16":
            return torch.autocast(self.dev.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.dev.device.type, enabled=False)

    # ---- the two workloads
    def forward_fn(self, model: Any, dtype: str, batch: int) -> Callable[[], None]:
        torch = self.torch
        x, t, y = self.inputs(batch)
        model.eval()

        def fn() -> None:
            with torch.no_grad(), self.autocast(dtype):
                model(x, t, y)

        return fn

    def train_fn(self, model: Any, net: Any, dtype: str, batch: int) -> Callable[[], None]:
        torch = self.torch
        x, t, y = self.inputs(batch)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)

        def fn() -> None:
            with self.autocast(dtype):
                loss = self.diffusion.training_losses(net, x, t, {"y": y})["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return fn

    # ---- one row: the models of one size under one setting, timed in turns
    def row(self, size: str, mode: str, dtype: str, compiled: bool) -> dict[str, Any] | None:
        args, torch = self.args, self.torch
        dit, dico = SIZES[size]
        names = [dit, dico]
        if self.published is not None and not compiled:
            names.append(f"published {dico}")
        if self.baseline is not None:
            names += [f"baseline {dit}", f"baseline {dico}"]
        batch = args.batch_forward if mode == "forward" else args.batch_train
        fns, first_call = {}, {}
        models = {}
        for name in names:
            model = self.build(name)
            net = torch.compile(model) if compiled else model
            fn = self.forward_fn(net, dtype, batch) if mode == "forward" else self.train_fn(model, net, dtype, batch)
            t0 = time.perf_counter()
            for _ in range(max(1, args.warmup)):
                fn()
            self.dev.sync()
            first_call[name] = time.perf_counter() - t0
            fns[name], models[name] = fn, model
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = timed_in_turns(fns, args.reps, self.dev.sync, clock)
        med = {k: statistics.median(v) for k, v in times.items()}
        memory = {}
        if mode == "train" and not args.no_memory:
            for name, fn in fns.items():
                memory[name] = self.dev.peak_memory(fn)
        row = {
            "size": size,
            "mode": mode,
            "dtype": dtype,
            "compile": compiled,
            "batch": batch,
            "images_per_s": {k: batch / v for k, v in med.items()},
            "seconds": {k: v for k, v in times.items()},
            "warmup_seconds": first_call,
            "peak_mib": memory,
        }
        row["ratio"] = paired_speedup(times[dit], times[dico])
        row["ratio_of_fastest"] = min(times[dit]) / min(times[dico])
        if f"published {dico}" in times:
            row["ours_over_published"] = paired_speedup(times[f"published {dico}"], times[dico])
            row["ours_over_published_fastest"] = min(times[f"published {dico}"]) / min(times[dico])
        if self.baseline is not None:
            row["ours_over_baseline"] = {m: paired_speedup(times[f"baseline {m}"], times[m]) for m in (dit, dico)}
            row["baseline_ratio"] = paired_speedup(times[f"baseline {dit}"], times[f"baseline {dico}"])
        if mode == "forward":
            row["paper_ratio"] = self.paper[dico] / self.paper[dit]
        del fns, models
        gc.collect()
        if self.dev.cuda:
            torch.cuda.empty_cache()
        return row

    def sampling(self, size: str, dtype: str) -> dict[str, Any]:
        """Guided iDDPM sampling (``generate``: cond + uncond batched into one forward per step) against the same
        number of bare model calls on the doubled batch. Both end with one synchronisation, none per step."""
        torch, args = self.torch, self.args
        from dico.diffusion.sampling import generate

        out: dict[str, Any] = {"size": size, "dtype": dtype, "steps": args.sample_steps, "batch": args.sample_batch}
        for name in SIZES[size]:
            model = self.build(name).eval()
            b = args.sample_batch
            labels = torch.randint(0, 1000, (b,), device=self.dev.device)
            x, t, y = self.inputs(2 * b)
            shape = (4, self.latent, self.latent)

            def sample(model: Any = model, labels: Any = labels, shape: tuple[int, ...] = shape) -> None:
                with self.autocast(dtype):
                    generate(model, labels, shape, model.null_label, steps=args.sample_steps, cfg_scale=args.cfg_scale)

            def bare(model: Any = model, x: Any = x, t: Any = t, y: Any = y) -> None:
                with torch.no_grad(), self.autocast(dtype):
                    for _ in range(args.sample_steps):
                        model(x, t, y)

            # warm up with a short run of each
            steps, args.sample_steps = args.sample_steps, 2
            sample(), bare()
            args.sample_steps = steps
            times = timed_in_turns({"sampling": sample, "bare": bare}, args.sample_reps, self.dev.sync)
            s, m = statistics.median(times["sampling"]), statistics.median(times["bare"])
            out[name] = {
                "sampling_samples_per_s": b / s,
                "bare_samples_per_s": b / m,
                "overhead": paired_speedup(times["bare"], times["sampling"]) ** -1 - 1,
                "seconds": times,
            }
            del model
            gc.collect()
        return out

    def profile(self, size: str, dtype: str) -> dict[str, Any]:
        """One training step of each model of ``size`` under ``torch.profiler`` (after warm-up), its time by group
        of operations (:func:`step_groups`), in ms."""
        args, torch = self.args, self.torch
        out: dict[str, Any] = {"size": size, "dtype": dtype, "batch": args.batch_train, "device": self.dev.name()}
        for name in SIZES[size]:
            model = self.build(name)
            fn = self.train_fn(model, model, dtype, args.batch_train)
            for _ in range(max(1, args.warmup)):
                fn()
            out[name] = profile_step(torch, fn, self.dev, model)
            del model, fn
            gc.collect()
        return out

    def over_budget(self) -> bool:
        return self.args.time_budget is not None and time.perf_counter() - self.start > self.args.time_budget

    def run(self) -> None:
        args = self.args
        settings = [False, True] if args.compile == "both" else [args.compile == "on"]
        self.header()
        for size in args.models:
            for dtype in args.dtypes:
                for compiled in settings:
                    for mode in args.modes:
                        label = f"{size} {mode} {dtype} {'compiled' if compiled else 'eager'}"
                        if self.over_budget():
                            print(f"skipped (time budget): {label}", flush=True)
                            continue
                        try:
                            row = self.row(size, mode, dtype, compiled)
                        except Exception as e:  # a failed setting must not lose the rest of the table
                            print(f"failed: {label}: {type(e).__name__}: {e}", flush=True)
                            continue
                        self.results.append(row)
                        self.print_row(row)
                        self.save(row)
        if args.profile:
            for size in args.models:
                if self.over_budget():
                    print(f"skipped (time budget): profile {size}", flush=True)
                    break
                p = self.profile(size, args.dtypes[0])
                self.results.append({"profile": p})
                print_profile(p)
                self.save({"profile": p})
        if args.sampling:
            for size in args.models[:1]:
                if self.over_budget():
                    print(f"skipped (time budget): sampling {size}", flush=True)
                    break
                s = self.sampling(size, args.dtypes[0])
                self.results.append({"sampling": s})
                self.print_sampling(s)
                self.save({"sampling": s})
        self.footer()

    # ---- output
    def header(self) -> None:
        torch, args = self.torch, self.args
        print(f"# device: {self.dev.name()}", flush=True)
        extra = ""
        if self.dev.cuda:
            extra = f", tf32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"
        if not self.dev.cuda and hasattr(os, "getloadavg"):
            extra = f", load average at start {os.getloadavg()[0]:.2f}"
        print(f"# torch {torch.__version__}, python {platform.python_version()}{extra}")
        print(
            f"# reps {args.reps} (median), warm-up {args.warmup}, image {args.image_size}px (latent {self.latent}), "
            f"{args.clock} clock"
        )
        cols = ["size", "mode", "dtype", "compile", "batch", "DiT img/s", "DiCo img/s", "DiCo/DiT", "paper"]
        if self.published is not None:
            cols += ["published img/s", "ours/published"]
        cols += ["DiT peak MiB", "DiCo peak MiB"] + (["published peak MiB"] if self.published is not None else [])
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|", flush=True)

    def print_row(self, row: dict[str, Any]) -> None:
        dit, dico = SIZES[row["size"]]
        ips, mem = row["images_per_s"], row["peak_mib"]

        def mib(name: str) -> str:
            v = mem.get(name)
            return "-" if v is None else f"{v:.0f}"

        cells = [
            row["size"],
            row["mode"],
            row["dtype"],
            "yes" if row["compile"] else "no",
            str(row["batch"]),
            f"{ips[dit]:.2f}",
            f"{ips[dico]:.2f}",
            f"{row['ratio']:.2f}x ({row['ratio_of_fastest']:.2f}x)",
            f"{row['paper_ratio']:.2f}x" if "paper_ratio" in row else "-",
        ]
        if self.published is not None:
            pub = ips.get(f"published {dico}")
            if pub is None:  # published code: eager rows only
                cells += ["-", "-"]
            else:
                cells += [
                    f"{pub:.2f}",
                    f"{row['ours_over_published']:.2f}x ({row['ours_over_published_fastest']:.2f}x)",
                ]
        cells += [mib(dit), mib(dico)] + ([mib(f"published {dico}")] if self.published is not None else [])
        print("| " + " | ".join(cells) + " |", flush=True)
        if "ours_over_baseline" in row:
            b = f"baseline {dit}", f"baseline {dico}"
            print(
                f"|   baseline tree: {dit} {ips[b[0]]:.2f} img/s, {dico} {ips[b[1]]:.2f} img/s, DiCo/DiT "
                f"{row['baseline_ratio']:.2f}x; this tree / baseline: {dit} {row['ours_over_baseline'][dit]:.2f}x, "
                f"{dico} {row['ours_over_baseline'][dico]:.2f}x",
                flush=True,
            )

    def print_sampling(self, s: dict[str, Any]) -> None:
        print(
            f"\nguided sampling ({s['steps']} steps, cfg {self.args.cfg_scale}, {s['batch']} samples, model batch "
            f"{2 * s['batch']}, {s['dtype']}, eager):"
        )
        for name in SIZES[s["size"]]:
            r = s[name]
            print(
                f"  {name}: {r['sampling_samples_per_s']:.3f} samples/s sampling vs {r['bare_samples_per_s']:.3f} "
                f"with bare model calls: overhead {100 * r['overhead']:+.1f}%",
                flush=True,
            )

    def footer(self) -> None:
        comp = [(r["size"], r["mode"], r["warmup_seconds"]) for r in self.results if r.get("compile")]
        for size, mode, w in comp:
            print(
                f"# compile + {self.args.warmup} warm-up call(s), {size} {mode}: "
                + ", ".join(f"{k} {v:.0f}s" for k, v in w.items())
            )
        print(
            "# ratios: median over turns of the per-turn time ratio (in brackets: ratio of the fastest turns); "
            "paper: Table 1 forward throughput ratio (A100, fp32, batch 64); peak MiB: a training step's peak "
            "above resident memory (CUDA allocator peak; CPU peak RSS)"
        )
        if not self.dev.cuda and hasattr(os, "getloadavg"):
            print(f"# load average at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} logical CPUs)")

    def save(self, row: dict[str, Any]) -> None:
        """Append one measured row to ``--json`` as a JSON line, the run's settings before the first (a run cut short
        by a time limit keeps every row it finished, and a cut mid-write loses at most that line)."""
        if not self.args.json:
            return
        path = Path(self.args.json)
        if not self._saved:
            meta = {"device": self.dev.name(), "torch": self.torch.__version__, "args": vars(self.args)}
            path.write_text(json.dumps({"meta": meta}) + "\n")
            self._saved = True
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = tune_cpu_env() if args.cpu_env == "tuned" else {}
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    import torch

    if env:
        print(f"# cpu env: {env}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    Bench(args).run()


if __name__ == "__main__":
    main()
