"""CPU threading of the entry points: passive OpenMP waiting and a thread count from the usable CPUs, the user's
environment first."""

from __future__ import annotations

import os
import subprocess
import sys

from dico.runtime import configure_cpu_threads, usable_cpus
from tests.conftest import ROOT


def test_defaults_are_passive_waiting_and_the_usable_cpus():
    env: dict[str, str] = {}
    assert configure_cpu_threads(env, cpus=3) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}


def test_the_users_settings_win_and_tuning_can_be_switched_off():
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_cpu_threads(env, cpus=8) == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    env = {"DICO_CPU_TUNING": "0"}
    assert configure_cpu_threads(env, cpus=8) == {} and env == {"DICO_CPU_TUNING": "0"}


def test_usable_cpus_follow_the_affinity_mask_and_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "missing") == affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert usable_cpus(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two threads, if the mask allows two
    assert usable_cpus(tmp_path / "cpu.max") == min(2, affinity)


def test_the_cli_runs_pinned_to_one_cpu_with_one_passive_thread():
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "sys.argv = ['cli', 'model-info', '--help'];"
        "import cli, contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: cli.main()\n"
        "    except SystemExit: pass\n"
        "import torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "DICO_CPU_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["1", "PASSIVE"]


def test_the_suite_itself_waits_passively_and_splits_the_cpus_between_workers():
    """tests/conftest.py sets these before torch loads: spinning OpenMP threads beside another pytest-xdist worker
    made in-process training 10x slower (benchmarks/RESULTS.md, suite time)."""
    import torch

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert torch.get_num_threads() <= max(1, usable_cpus() // workers)
