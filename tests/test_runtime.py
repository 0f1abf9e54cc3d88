"""The environment of the entry points: CPU threading (passive OpenMP waiting and a thread count from the usable CPUs,
the user's environment first) and the Hugging Face Hub's offline switch with huggingface_hub's meaning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dico.runtime import configure_cpu_threads, hub_offline, usable_cpus
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


HUB_OFFLINE_VALUES = ["1", "true", "TRUE", "yes", "on", "0", "false", "no", "off", "", "2"]

# What huggingface_hub itself makes of each value (it reads the variable once, when its constants are imported).
HUB_OWN_READING = """
import importlib, json, os, sys
from huggingface_hub import constants
seen = {}
for value in sys.argv[1:]:
    os.environ["HF_HUB_OFFLINE"] = value
    seen[value] = importlib.reload(constants).HF_HUB_OFFLINE
print(json.dumps(seen))
"""


def test_hf_hub_offline_means_what_it_means_to_huggingface_hub():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run(
        [sys.executable, "-c", HUB_OWN_READING, *HUB_OFFLINE_VALUES],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    hubs = json.loads(out.strip().splitlines()[-1])
    assert {v: hub_offline({"HF_HUB_OFFLINE": v}) for v in HUB_OFFLINE_VALUES} == hubs
    assert hubs["no"] is False and hubs["1"] and hubs["true"] and hubs["yes"]  # the cases that used to differ
    assert hub_offline({"TRANSFORMERS_OFFLINE": "1"}) and not hub_offline({})


@pytest.mark.parametrize(
    ("value", "offline"), [("no", False), ("0", False), ("1", True), ("true", True), ("yes", True)]
)
def test_dico_goes_offline_exactly_when_huggingface_hub_does(value, offline, monkeypatch):
    """The VAE check before sampling: online it leaves the hub to huggingface_hub; offline it names the cache."""
    from dico.pretrained import WeightsNotFoundError, check_vae_available

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-dico-hub-cache")
    if offline:
        with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
            check_vae_available("dico-tests/no-such-vae")
    else:
        check_vae_available("dico-tests/no-such-vae")  # nothing is fetched here: loading would go online
