"""`python cli.py fit` of a paper config on one GPU, beside the bare training step of the same model (not a test).

    python benchmarks/gpu_fit.py                                   # DiCo-XL 256, batch 32: about 6 minutes on an H200
    python benchmarks/gpu_fit.py --overlay experiments/dico-s-256.yaml --precisions bf16-mixed
    python benchmarks/gpu_fit.py --dry-run                         # tiny model on the CPU: checks the logic

Phases, each in a fresh interpreter (as a user starts ``python cli.py``) under its own time limit, printing its
lines as it goes (a phase cut short keeps the lines it finished):

1. ``setup``: a synthetic latent cache (4x32x32 VAE moments with a strictly positive std) and a tiny random
   ``AutoencoderKL`` saved locally: nothing is downloaded.
2. per precision (``32-true``: fp32 with PyTorch's default TF32 flags, the paper's setting; ``bf16-mixed``):
   ``bare``: the training step alone (module loss, backward, AdamW; then the same with the EMA update) on batches
   already on the device; ``fit``: ``cli.main(["fit", "-c", base, "-c", overlay, ...])`` with the config's
   callbacks and loggers except the FID evaluation (no Inception weights here), wandb offline, a timing callback
   and a timed checkpoint writer: start-up to the first step, steady img/s after warm-up (no logging, no save),
   then a window holding the run's one logging step and one holding a ``last.ckpt`` save, each reported on its
   own, peak memory of the steady steps and with both, the ``last.ckpt`` write (seconds, GB, GB/s) and what the
   end of fit costs after the last step.
3. ``sampling``: guided 250-step iDDPM of the trained checkpoint as ``sample`` and ``test`` run it
   (``DiffusionModule.sample``; ``cli.py sample`` end to end) against the bare model calls it makes.

Each phase runs in its own process group; one that reaches its limit (or a cut of this script: SIGINT or SIGTERM,
e.g. ``timeout``) is ended with its whole group (loader workers included), and the table of what was measured is
printed all the same. The phases' limits (``--limits``) must add up to less than ``--time-limit`` (the stage's), and
no phase runs past it. ``--json PATH`` receives every number as a JSON line the moment it is measured (outside the
work folder, so a cut run keeps them). ``--fork`` runs the phases in forked children of this process instead of
fresh interpreters (the CPU dry run in the test suite; no start-up cost).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(HERE)]  # `import cli, dico` from this tree; `gpu_fit.FitTimer` for the config

from dico.runtime import configure_cpu_threads  # noqa: E402

configure_cpu_threads()  # before torch loads, as `python cli.py` does (passive OpenMP waiting)

from training import synthetic_cache  # noqa: E402  (benchmarks/training.py)

LOG_WINDOW = 10  # steps after the steady ones, with the one logging step in the middle: its cost to training
SAVE_WINDOW = 10  # steps after those, with one last.ckpt save in the middle: the save's cost to training
LIMITS = {"setup": 25, "bare": 50, "fit": 120, "sampling": 70}  # seconds per phase (bare and fit: per precision)
TIME_LIMIT = 450  # seconds for the whole script (gpu.sh stage 5 gives it this, plus its table's margin)
DRY_RUN_LIMITS, DRY_RUN_TIME_LIMIT = {"setup": 120, "bare": 120, "fit": 240, "sampling": 120}, 1000  # a 2-core CPU
STEPS, DRY_RUN_STEPS = (10, 50), (2, 7)  # (warm-up, timed) steps of the bare step and of fit
RESERVE = 10  # seconds of the time limit kept for ending a phase's process group and printing the table
# The dry run: a DiCo of the same stages at tiny width on 4x8x8 latents
TINY_MODEL = {"hidden_size": 16, "depth": [1, 1, 1, 1, 1], "input_size": 8}


def log(line: str) -> None:
    print(line, flush=True)


def record(results: Path, phase: str, **values: Any) -> None:
    """Append one measurement (a JSON line) as soon as it exists: a phase killed later keeps it."""
    with open(results, "a") as f:
        f.write(json.dumps({"phase": phase, **values}) + "\n")


# ---------------------------------------------------------------------------------------------- config
RUN_DIR = "@RUN_DIR@"  # stands for each fit's run folder in the composed config


def composed_config(args: argparse.Namespace) -> dict[str, Any]:
    """base + overlay (and the named callbacks every config composes) as ``cli.py fit --print_config`` resolves
    them, with the run folder left as :data:`RUN_DIR` and the data at the synthetic cache; cached in the work folder."""
    cached = args.work / "composed.yaml"
    if not cached.exists():
        argv = [sys.executable, str(ROOT / "cli.py"), "fit", "-c", str(args.base), "-c", str(args.overlay),
                "--trainer.default_root_dir", RUN_DIR, "--data.init_args.root", str(args.work / "cache"),
                "--print_config"]  # fmt: skip  # argv: flag/value pairs
        printed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        if printed.returncode != 0:
            raise SystemExit(f"could not compose {args.base} + {args.overlay}:\n{printed.stderr[-2000:]}")
        cached.write_text(printed.stdout)
    return yaml.safe_load(cached.read_text())


def resolve(value: Any, run_dir: Path) -> Any:
    """``value`` with :data:`RUN_DIR` replaced by ``run_dir`` in every string."""
    if isinstance(value, str):
        return value.replace(RUN_DIR, str(run_dir))
    if isinstance(value, list):
        return [resolve(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, run_dir) for k, v in value.items()}
    return value


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def fit_argv(args: argparse.Namespace, precision: str, run_dir: Path, results: Path, launched: float) -> list[str]:
    """The ``fit`` command line: the paper config, one device, the synthetic data, the config's callbacks without the
    FID evaluation and with :class:`FitTimer`, the checkpoint writer timed (:class:`TimedCheckpointIO`)."""
    cfg = composed_config(args)
    timer = {
        "class_path": "gpu_fit.FitTimer",
        "init_args": {
            "warmup": args.warmup,
            "steps": args.steps,
            "results": str(results),
            "phase": f"fit {precision}",
            "launched": launched,
        },
    }
    checkpoint_io = {
        "class_path": "gpu_fit.TimedCheckpointIO",
        "init_args": {"results": str(results), "phase": f"fit {precision}"},
    }
    if precision in args.async_checkpoint:  # Lightning's thread writer around the same atomic writer
        checkpoint_io = {
            "class_path": "lightning.pytorch.plugins.io.AsyncCheckpointIO",
            "init_args": {"checkpoint_io": checkpoint_io},
        }
    loggers = cfg["trainer"].get("logger") or []
    if not wandb_installed():  # the GPU image has no wandb unless its wheel is carried: keep the CSV logger
        loggers = [lg for lg in loggers if "Wandb" not in lg["class_path"]]
        log("[gpu_fit] wandb is not installed: the fit runs without the config's wandb logger")
    argv = [
        "fit", "-c", str(args.base), "-c", str(args.overlay),
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.accelerator", args.accelerator,
        "--trainer.precision", precision,
        "--trainer.max_steps", str(args.warmup + args.steps + LOG_WINDOW + SAVE_WINDOW),
        # Lightning logs batch b when (b + 1) % log_every_n_steps == 0: once, in the middle of the logging window
        "--trainer.log_every_n_steps", str(args.warmup + args.steps + LOG_WINDOW // 2 + 1),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.callbacks", json.dumps([timer]),
        "--fid", "null",
        # last.ckpt once, inside the save window after the steady steps (see FitTimer)
        "--checkpoint.every_n_train_steps", str(args.warmup + args.steps + LOG_WINDOW + SAVE_WINDOW // 2),
        "--trainer.logger", json.dumps(resolve(loggers, run_dir)),
        "--trainer.plugins", json.dumps([checkpoint_io]),
        "--data.init_args.root", str(args.work / "cache"),
        "--data.init_args.vae", str(args.work / "vae"),
        "--data.init_args.batch_size", str(args.batch),
    ]  # fmt: skip  # argv: flag/value pairs
    if 2 * (args.warmup + args.steps + LOG_WINDOW // 2 + 1) <= args.warmup + args.steps + LOG_WINDOW + SAVE_WINDOW:
        raise SystemExit("--warmup + --steps must be at least 9: a second logging step would fall inside the windows")
    if args.num_workers is not None:
        argv += ["--data.init_args.num_workers", str(args.num_workers)]
    if args.model_kwargs:
        argv += ["--model.model_kwargs", json.dumps(args.model_kwargs)]
    if args.compile:
        argv += ["--model.compile", "true"]
    if args.dry_run:  # the final sample grid at the end of fit: a few steps
        argv += ["--model.sampling_steps", str(args.sample_steps)]
    return argv


# ---------------------------------------------------------------------------------------------- callbacks
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


try:
    from lightning.pytorch import Callback

    from dico.checkpoints import AtomicCheckpointIO
except ImportError:  # the parent of fresh interpreters needs neither
    Callback = AtomicCheckpointIO = object  # type: ignore[misc,assignment]


class FitTimer(Callback):  # type: ignore[misc,valid-type]
    """Times a ``fit`` from the launch of its interpreter: start-up to the end of the first step (with where it went),
    then ``steps`` steps after ``warmup`` without logging or saving (the device synchronised only at both ends), then
    :data:`LOG_WINDOW` steps holding the run's one logging step and :data:`SAVE_WINDOW` steps holding one
    ``last.ckpt`` save, each reported as its excess over as many steady steps; peak memory of the steady steps and
    of all three windows (the save's included: ``AsyncCheckpointIO`` first copies every tensor on the device)."""

    def __init__(self, warmup: int, steps: int, results: str, phase: str, launched: float) -> None:
        self.warmup, self.steps, self.results, self.phase, self.launched = warmup, steps, Path(results), phase, launched
        self.marks: dict[str, float] = {}
        self._t0 = 0.0

    def _mark(self, name: str) -> float:
        self.marks[name] = time.time() - self.launched
        return self.marks[name]

    def setup(self, trainer, pl_module, stage):  # type: ignore[no-untyped-def]
        self._mark("config parsed, model built")

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self._mark("model on the device, optimizer")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == 0 and "first batch" not in self.marks:
            self._mark("first batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        batch_size = batch["y"].shape[0]
        if step == 1:
            _sync()
            startup = self._mark("first step done")
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.marks.items())
            log(f"[{self.phase}] start-up to the first step: {startup:.1f} s ({parts})")
            record(self.results, self.phase, startup_s=startup, marks=self.marks)
        if step == self.warmup:
            _sync()
            self._t0 = time.perf_counter()
            if _cuda():
                import torch

                torch.cuda.reset_peak_memory_stats()
        elif self.warmup < step < self.warmup + self.steps and (step - self.warmup) % 10 == 0:
            rate = (step - self.warmup) * batch_size / (time.perf_counter() - self._t0)
            log(f"[{self.phase}] step {step}: {rate:.1f} img/s so far (device not synchronised)")
        elif step == self.warmup + self.steps:
            _sync()
            elapsed = time.perf_counter() - self._t0
            rate = self.steps * batch_size / elapsed
            log(
                f"[{self.phase}] steady: {rate:.2f} img/s over {self.steps} steps after {self.warmup} "
                f"({elapsed / self.steps * 1000:.1f} ms/step), peak memory {_peak_gib():.2f} GiB"
            )
            record(
                self.results,
                self.phase,
                img_per_s=rate,
                ms_per_step=1000 * elapsed / self.steps,
                peak_gib=_peak_gib(),
                batch=batch_size,
            )
            self._step_s, self._t0 = elapsed / self.steps, time.perf_counter()
        elif step == self.warmup + self.steps + LOG_WINDOW:
            _sync()
            window = time.perf_counter() - self._t0
            extra = window - LOG_WINDOW * self._step_s
            log(
                f"[{self.phase}] {LOG_WINDOW} steps with the logging step (step {step - LOG_WINDOW // 2}): "
                f"{window:.2f} s, {extra:.3f} s more than {LOG_WINDOW} steady steps (what logging costs: the "
                "logged values read back from the device, the loggers' writes)"
            )
            record(self.results, self.phase, log_step_s=extra)
            self._t0 = time.perf_counter()
        elif step == self.warmup + self.steps + LOG_WINDOW + SAVE_WINDOW:
            _sync()
            window = time.perf_counter() - self._t0
            stall = window - SAVE_WINDOW * self._step_s
            log(
                f"[{self.phase}] {SAVE_WINDOW} steps with a last.ckpt save at step {step - SAVE_WINDOW // 2}: "
                f"{window:.2f} s, {stall:.2f} s more than {SAVE_WINDOW} steady steps (what the save stalls "
                "training; an asynchronous write finishes later, in its thread); peak memory since the steady "
                f"steps began, the logging step and the save included: {_peak_gib():.2f} GiB"
            )
            record(
                self.results, self.phase, save_stall_s=stall, peak_with_save_gib=_peak_gib(), last_step_at=time.time()
            )


class TimedCheckpointIO(AtomicCheckpointIO):  # type: ignore[misc,valid-type]
    """The project's atomic checkpoint writer, timed: seconds, GB and GB/s of each write."""

    def __init__(self, results: str, phase: str) -> None:
        super().__init__()
        self.results, self.phase = Path(results), phase

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        start = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options)
        seconds = time.perf_counter() - start
        gb = Path(path).stat().st_size / 1e9
        log(
            f"[{self.phase}] checkpoint write {Path(path).name}: {seconds:.2f} s, {gb:.3f} GB, "
            f"{gb / seconds:.2f} GB/s (atomic: temp file, fsync, rename)"
        )
        record(self.results, self.phase, ckpt_s=seconds, ckpt_gb=gb, ckpt_gb_per_s=gb / seconds)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- phases
def phase_setup(args: argparse.Namespace, results: Path) -> None:
    """The synthetic latent cache and a tiny random VAE (8x downsampling, like SD's) saved locally."""
    import torch
    from diffusers.models import AutoencoderKL

    cfg = composed_config(args)
    latent = args.latent_size
    count = max(args.batch * (args.warmup + args.steps + 8) * 2, 512)
    start = time.perf_counter()
    (args.work / "cache").mkdir(exist_ok=True)
    synthetic_cache(args.work / "cache", count, shard_size=4096, shape=(4, latent, latent))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        sample_size=8 * latent,
    )
    vae.save_pretrained(args.work / "vae")
    seconds = time.perf_counter() - start
    log(
        f"[setup] {count} synthetic latents 4x{latent}x{latent} and a tiny random VAE in {seconds:.1f} s; model "
        f"{cfg['model']['model']}{' ' + json.dumps(args.model_kwargs) if args.model_kwargs else ''}"
    )
    record(results, "setup", seconds=seconds, latents=count)


def _module(args: argparse.Namespace) -> Any:
    from dico.module import DiffusionModule

    model_cfg = composed_config(args)["model"]
    if args.model_kwargs:
        model_cfg = {**model_cfg, "model_kwargs": args.model_kwargs}
    return DiffusionModule(**{**model_cfg, "compile": args.compile or model_cfg.get("compile", False)})


def phase_bare(args: argparse.Namespace, results: Path, precision: str) -> None:
    """The training step alone: module loss (posterior sample, timesteps, noise, label dropout), backward, AdamW as
    the module configures it; then the same plus the EMA update (one fused lerp over the weights)."""
    import torch

    from dico.data.latents import ShardedLatents

    phase = f"bare {precision}"
    device = torch.device("cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    module = _module(args).to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    data = ShardedLatents(args.work / "cache")
    rng = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        index = torch.randint(0, len(data), (args.batch,), generator=rng).numpy()
        batches.append({k: v.to(device) for k, v in data.read(index, index * 0).items()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    params = [p for p in module.model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]

    def step(i: int, with_ema: bool) -> None:
        with autocast:
            loss = module._losses(batches[i % len(batches)], module._generator(1, 0, i, 0), train=True)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_ema:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)

    for with_ema in (False, True):
        for i in range(args.warmup):
            step(i, with_ema)
        _sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(args.steps):
            step(i, with_ema)
        _sync()
        elapsed = time.perf_counter() - start
        rate = args.steps * args.batch / elapsed
        what = "step + EMA" if with_ema else "step"
        log(
            f"[{phase}] {what}: {rate:.2f} img/s over {args.steps} steps after {args.warmup} "
            f"({elapsed / args.steps * 1000:.1f} ms/step), peak memory {_peak_gib():.2f} GiB"
        )
        key = "ema_" if with_ema else ""
        record(
            results,
            phase,
            **{
                f"{key}img_per_s": rate,
                f"{key}ms_per_step": 1000 * elapsed / args.steps,
                f"{key}peak_gib": _peak_gib(),
            },
        )


def phase_fit(args: argparse.Namespace, results: Path, precision: str, launched: float) -> None:
    import cli

    phase = f"fit {precision}"
    sys.argv = ["cli.py"]  # as `python cli.py fit ...` sees it
    status = cli.main(fit_argv(args, precision, run_dir := args.work / f"run-{precision}", results, launched))
    if status != 0:
        raise SystemExit(status)
    last_step = read_results(results).get(phase, {}).get("last_step_at")
    if last_step is not None:  # the final checkpoint, the final sample grid, loggers' and callbacks' train-end work
        end = time.time() - last_step
        log(f"[{phase}] end of fit: {end:.1f} s from the last step until `fit` returned ({run_dir})")
        record(results, phase, end_of_fit_s=end)


def phase_sampling(args: argparse.Namespace, results: Path, ckpt: str | None) -> None:
    """Guided iDDPM of the checkpoint's EMA weights: the bare model calls (doubled batch, as guidance runs them),
    ``DiffusionModule.sample`` (what ``test``'s FID protocol and the sample grids call) and ``cli.py sample``."""
    import torch

    import cli
    import dico.sample_jobs
    from dico.sample_jobs import load_module

    phase = "sampling"
    device = torch.device("cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    if ckpt is None:
        log(f"[{phase}] no checkpoint from fit: sampling a freshly initialised model (cli.py sample skipped)")
        torch.manual_seed(0)
        module = _module(args)
    else:
        module = load_module(ckpt)
    module.to(device).eval()
    model, hp = module.model, module.hparams
    b, steps = args.sample_batch, args.sample_steps
    labels = torch.arange(b, device=device) % model.num_classes
    shape = (model.in_channels, model.input_size, model.input_size)
    x = torch.randn(2 * b, *shape, device=device)
    y2 = torch.cat([labels, torch.full_like(labels, model.null_label)])
    times = torch.linspace(999, 0, steps, device=device).long()

    @torch.no_grad()
    def bare(n: int) -> float:
        _sync()
        start = time.perf_counter()
        for i in range(n):
            model(x, times[i * steps // n].expand(2 * b), y2)
        _sync()
        return time.perf_counter() - start

    def sample(n: int) -> float:
        _sync()
        start = time.perf_counter()
        module.sample(labels, steps=n, sampler="iddpm", seed=0, decode=False)
        _sync()
        return time.perf_counter() - start

    guided = f"cfg {hp.cfg_scale:g} ({hp.guidance_mode})"
    warm = min(10, steps)
    bare(warm), sample(warm)  # warm-up: kernels chosen, allocator filled, the sampler's tables on the device
    tb, ts = bare(steps), sample(steps)
    log(
        f"[{phase}] {steps}-step iDDPM, {b} samples, {guided}: bare model calls {b / tb:.2f} samples/s, "
        f"DiffusionModule.sample {b / ts:.2f} samples/s: overhead {100 * (ts / tb - 1):.1f}%"
    )
    record(results, phase, bare_samples_per_s=b / tb, module_samples_per_s=b / ts, overhead_pct=100 * (ts / tb - 1))
    if ckpt is None:
        return
    timed: dict[str, float] = {}

    class TimedTrainer(dico.sample_jobs.Trainer):  # the predict loop alone, without loading and writing
        def predict(self, *a: Any, **k: Any) -> Any:
            _sync()
            start = time.perf_counter()
            try:
                return super().predict(*a, **k)
            finally:
                _sync()
                timed["predict"] = time.perf_counter() - start

    dico.sample_jobs.Trainer = TimedTrainer  # type: ignore[misc]
    out = args.work / "samples"
    shutil.rmtree(out, ignore_errors=True)  # a finished set of an earlier run would be reused, not sampled
    start = time.perf_counter()
    sys.argv = ["cli.py"]
    status = cli.main(["sample", "--ckpt", ckpt, "--out", str(out), "--num_samples", str(b), "--batch_size", str(b),
                       "--steps", str(steps), "--sampler", "iddpm", "--vae", str(args.work / "vae"),
                       "--accelerator", args.accelerator])  # fmt: skip  # argv: flag/value pairs
    total = time.perf_counter() - start
    if status != 0:
        raise SystemExit(status)
    predict = timed.get("predict", float("nan"))
    log(
        f"[{phase}] cli.py sample ({b} samples): {total:.1f} s in all, of which the predict loop {predict:.1f} s "
        f"({b / predict:.2f} samples/s, {100 * (predict / tb - 1):.1f}% over the bare calls; it includes loading "
        "and running the tiny VAE); the rest is loading the checkpoint and writing the files"
    )
    record(results, phase, sample_cli_s=total, sample_predict_s=predict, sample_cli_samples_per_s=b / predict)


# ---------------------------------------------------------------------------------------------- driver
PHASES = {"setup": phase_setup, "bare": phase_bare, "fit": phase_fit, "sampling": phase_sampling}


def child_main(argv: list[str]) -> None:
    """``gpu_fit.py --child PHASE JSON``: one phase in this interpreter."""
    phase, spec = argv[0], json.loads(argv[1])
    paths = ("work", "base", "overlay", "json")
    args = argparse.Namespace(**{k: Path(v) if k in paths and v else v for k, v in spec["args"].items()})
    PHASES[phase](args, Path(spec["results"]), *spec["extra"])


CUT: list[str] = []  # the signal that cut this script (SIGINT or SIGTERM, e.g. from `timeout`), once one came


def _cut(signum: int, frame: Any) -> None:  # noted only: the waits below poll it (an exception could land anywhere)
    CUT.append(signal.Signals(signum).name)


def _own_group(target: Any, *args: Any) -> None:
    """The forked child: leader of its own process group, with the default signal handlers (not the parent's)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    target(*args)


def end_group(pid: int) -> None:
    """SIGINT to the phase's process group (Lightning stops cleanly on it), SIGKILL to what is left after 5 s."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_phase(args: argparse.Namespace, results: Path, phase: str, limit: float, *extra: Any) -> bool:
    """Run one phase in its own process group under ``limit`` seconds, never past the script's deadline; a phase
    cut short (or a cut of this script) ends its whole group; its printed lines and recorded numbers stay."""
    label = " ".join([phase, *(str(e) for e in extra if isinstance(e, str) and not e.startswith("/"))])
    limit = min(limit, args.deadline - time.monotonic() - RESERVE)
    if CUT or limit <= 0:
        log(f"== {label}: skipped ({f'cut by {CUT[0]}' if CUT else 'the time limit is reached'})")
        return False
    log(f"== {label} (at most {limit:.0f} s)")
    start = time.perf_counter()
    spec = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": str(results),
        "extra": list(extra),
    }
    if args.fork:
        proc = multiprocessing.get_context("fork").Process(
            target=_own_group, args=(child_main, [phase, json.dumps(spec)])
        )
        proc.start()
        pid, poll = proc.pid, lambda: proc.exitcode
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            [sys.executable, __file__, "--child", phase, json.dumps(spec)], env=env, start_new_session=True
        )
        pid, poll = popen.pid, popen.poll
    end = time.monotonic() + limit
    while poll() is None and time.monotonic() < end and not CUT:
        time.sleep(0.1)
    status: Any = poll()
    if status is None:  # past its limit, or this script was cut
        end_group(pid)
        status = f"cut by {CUT[0]}" if CUT else "time limit"
        for _ in range(50):  # reap it
            if poll() is not None:
                break
            time.sleep(0.1)
    ok = status == 0
    log(f"== {label}: {'done' if ok else f'ended ({status})'} in {time.perf_counter() - start:.1f} s")
    return ok


def read_results(results: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row.pop("phase"), {}).update(row)
    return out


def table(found: dict[str, dict[str, Any]], precisions: list[str], async_io: list[str]) -> list[tuple[str, str, Any]]:
    """(phase, quantity, value) for every number the run should have; None where it is missing."""
    rows: list[tuple[str, str, float | None]] = [("setup", "seconds", found.get("setup", {}).get("seconds"))]
    for p in precisions:
        bare, fit = found.get(f"bare {p}", {}), found.get(f"fit {p}", {})
        rows += [
            (f"bare {p}", "img/s", bare.get("img_per_s")),
            (f"bare {p}", "img/s with EMA", bare.get("ema_img_per_s")),
            (f"bare {p}", "peak GiB", bare.get("ema_peak_gib")),
            (f"fit {p}", "start-up to the first step, s", fit.get("startup_s")),
            (f"fit {p}", "img/s", fit.get("img_per_s")),
            (f"fit {p}", "peak GiB, steady steps", fit.get("peak_gib")),
            (f"fit {p}", "peak GiB, with logging and save", fit.get("peak_with_save_gib")),
            (
                f"fit {p}",
                "fit / bare step",
                fit["img_per_s"] / bare["img_per_s"] if "img_per_s" in fit and "img_per_s" in bare else None,
            ),
            (
                f"fit {p}",
                "fit / bare step + EMA",
                fit["img_per_s"] / bare["ema_img_per_s"] if "img_per_s" in fit and "ema_img_per_s" in bare else None,
            ),
            (f"fit {p}", "logging step, s over a steady step", fit.get("log_step_s")),
            (f"fit {p}", "save stall on training, s" + (" (async)" if p in async_io else ""), fit.get("save_stall_s")),
            (f"fit {p}", "last.ckpt write, s", fit.get("ckpt_s")),
            (f"fit {p}", "last.ckpt, GB", fit.get("ckpt_gb")),
            (f"fit {p}", "last.ckpt write, GB/s", fit.get("ckpt_gb_per_s")),
            (f"fit {p}", "end of fit after the last step, s", fit.get("end_of_fit_s")),
        ]
    s = found.get("sampling", {})
    rows += [
        ("sampling", "bare model calls, samples/s", s.get("bare_samples_per_s")),
        ("sampling", "DiffusionModule.sample, samples/s", s.get("module_samples_per_s")),
        ("sampling", "cli.py sample predict loop, samples/s", s.get("sample_cli_samples_per_s")),
        ("sampling", "cli.py sample in all, s", s.get("sample_cli_s")),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=ROOT / "experiments" / "base.yaml")
    parser.add_argument("--overlay", type=Path, default=ROOT / "experiments" / "dico-xl-256.yaml")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--async-checkpoint",
        nargs="*",
        default=["bf16-mixed"],
        help="precisions whose fit writes checkpoints through Lightning's AsyncCheckpointIO",
    )
    parser.add_argument("--batch", type=int, default=32, help="per-device batch (the paper's: 32 on each of 8 GPUs)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"steps before the timed ones ({STEPS[0]}; --dry-run: {DRY_RUN_STEPS[0]})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps after the warm-up ({STEPS[1]}; --dry-run: {DRY_RUN_STEPS[1]})",
    )
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=250)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: the config's)")
    parser.add_argument(
        "--limits",
        type=json.loads,
        default={},
        help=f"seconds per phase (bare, fit: per precision), JSON: {json.dumps(LIMITS)} (--dry-run: "
        f"{json.dumps(DRY_RUN_LIMITS)}); the phases not named keep theirs",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds for the whole run (the stage's limit; the phases' limits must add up to less): "
        f"{TIME_LIMIT} ({DRY_RUN_TIME_LIMIT} with --dry-run)",
    )
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="every measurement as a JSON line, written when measured (kept when the run is cut)",
    )
    parser.add_argument("--fork", action="store_true", help="phases in forked children, not fresh interpreters")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="model.compile (Inductor) in fit and the bare step; "
        "cold compilation of DiCo-XL takes minutes: raise --limits and run one precision",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny model and sizes on the CPU (checks the logic)")
    args = parser.parse_args(argv)
    args.accelerator, args.model_kwargs = "auto", None
    if args.dry_run:
        args.accelerator, args.model_kwargs, args.latent_size = "cpu", TINY_MODEL, 8
        args.batch, args.sample_batch, args.sample_steps = 4, 2, 4
        args.num_workers = 0 if args.num_workers is None else args.num_workers
    warmup, steps = DRY_RUN_STEPS if args.dry_run else STEPS
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep = args.work is not None
    args.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_fit-")).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.json or args.work / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    limits = {**(DRY_RUN_LIMITS if args.dry_run else LIMITS), **args.limits}
    if args.time_limit is None:
        args.time_limit = DRY_RUN_TIME_LIMIT if args.dry_run else TIME_LIMIT
    planned = limits["setup"] + len(args.precisions) * (limits["bare"] + limits["fit"]) + limits["sampling"]
    if planned > args.time_limit - RESERVE:
        raise SystemExit(
            f"the phases' limits add up to {planned:.0f} s (setup + {len(args.precisions)} x (bare + fit) "
            f"+ sampling), more than --time-limit {args.time_limit:.0f} s less {RESERVE} s: lower "
            f"--limits or raise --time-limit"
        )
    args.deadline = time.monotonic() + args.time_limit
    start = time.perf_counter()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _cut)
    log(
        f"[gpu_fit] {args.base.name} + {args.overlay.name}, batch {args.batch}, precisions {args.precisions}, "
        f"{args.steps} timed steps after {args.warmup}; work folder {args.work}"
    )
    try:
        ckpt = None
        if run_phase(args, results, "setup", limits["setup"]):
            for precision in args.precisions:
                run_phase(args, results, "bare", limits["bare"], precision)
                if run_phase(args, results, "fit", limits["fit"], precision, time.time()):
                    last = args.work / f"run-{precision}" / "checkpoints" / "last.ckpt"
                    if last.exists():
                        if ckpt is not None:  # keep one (DiCo-XL's is ~11 GB)
                            Path(ckpt).unlink(missing_ok=True)
                        ckpt = str(last)
            run_phase(args, results, "sampling", limits["sampling"], ckpt)
        found = read_results(results)
        rows = table(found, args.precisions, args.async_checkpoint)
        log(f"\n{'phase':<18} {'quantity':<40} {'value':>10}")
        for phase, quantity, value in rows:
            shown = "missing" if value is None or value != value else f"{value:.3f}"
            log(f"{phase:<18} {quantity:<40} {shown:>10}")
        log(
            f"[gpu_fit] {f'cut by {CUT[0]}' if CUT else 'done'} in {time.perf_counter() - start:.1f} s"
            + (f"; every number as JSON lines in {args.json}" if args.json else "")
        )
        if CUT:
            return 124  # as `timeout` reports a command it cut
        return 0 if all(v is not None and v == v for _, _, v in rows) else 1
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
