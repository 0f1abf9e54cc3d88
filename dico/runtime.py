"""The environment dico's entry points read: CPU threading (set before torch's OpenMP runtime starts) and the
Hugging Face Hub's offline switch (:func:`hub_offline`, the one reader of ``HF_HUB_OFFLINE`` in dico).

Two settings matter on small CPU machines that other processes share (laptops, CI runners, a node's spare cores):

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP workers sleep instead of spinning. With other work on the machine, spinning
  workers hold their core for a scheduler slice at every parallel region; on a loaded 2-core machine the quickstart's
  training step ran 6-7x faster passive than spinning (benchmarks/RESULTS.md), and unloaded it costs nothing.
- the intra-op thread count: the CPUs this process may use (its affinity mask, and a cgroup CPU quota when one is
  set, as in containers), so that a job pinned to fewer cores does not start more threads than it has cores.

The user's own ``OMP_WAIT_POLICY`` / ``OMP_NUM_THREADS`` always win; ``DICO_CPU_TUNING=0`` leaves both alone.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``) if any."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def configure_cpu_threads(environ: MutableMapping[str, str] = os.environ, cpus: int | None = None) -> dict[str, str]:
    """Set ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` in ``environ`` unless the user set them; returns what applies.

    Call before ``import torch`` (the OpenMP runtime reads both once, when it starts); later calls still set the
    thread count through ``torch.set_num_threads`` but cannot change the wait policy.
    """
    if environ.get("DICO_CPU_TUNING", "1") == "0":
        return {}
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ.setdefault("OMP_NUM_THREADS", str(cpus if cpus is not None else usable_cpus()))
    if environ is os.environ and "torch" in sys.modules:
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    return {key: environ[key] for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}


def hub_offline(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the Hugging Face Hub is switched off, with huggingface_hub's own meaning: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is one of its true values (``1``, ``ON``, ``TRUE``, ``YES``, any case); anything else,
    ``no`` and ``0`` included, is online. Read now, not when huggingface_hub was imported."""
    from huggingface_hub import constants

    value = environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in constants.ENV_VARS_TRUE_VALUES


def show_traceback(environ: Mapping[str, str] = os.environ) -> bool:
    """``DICO_TRACEBACK=1``: the command line shows the traceback of an error from user input (a bad option, file or
    config value) instead of its one-line message."""
    return environ.get("DICO_TRACEBACK", "0") not in ("0", "", "false", "False")


def code_state() -> dict[str, Any]:
    """The checkout's commit, whether tracked files differ from it and (the first 20 of) those that do (``git``;
    commit "unknown" outside a checkout)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None, "changed": []}
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:20]}


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> int | None:
    """This SLURM job's id (``SLURM_JOB_ID``; unique per array task), with Lightning's meaning
    (``SLURMEnvironment.job_id``): None outside SLURM and in an interactive allocation (job name ``bash`` or
    ``interactive``). Read here without importing Lightning, for the run-folder lock."""
    if environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    try:
        return int(environ["SLURM_JOB_ID"])
    except (KeyError, ValueError):
        return None
