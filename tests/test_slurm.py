"""The sbatch scripts of slurm/ against a real SLURM: slurmctld and slurmd on this machine.

The fixture starts both daemons from a temporary folder (no munge: auth/none) when they are
installed (Debian's slurm-wlm; .ci/run installs it) and this process may run them (root);
otherwise every test here is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SMALL, read_datasets, small_config

from dmeta.runner import default_threads, plan_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = [*SMALL, "iterations=600", "log_every=10", "checkpoint.poll_every=2"]
VARYING = ("time/wall", "time/compute", "time/comm", "time/log")

SLURM_CONF = """\
ClusterName=dmeta-test
SlurmctldHost=localhost
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment variables under which sbatch, squeue and scontrol reach the test cluster."""
    missing = [name for name in ("slurmctld", "slurmd", "sbatch") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found; apt slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs, and this test is not root")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    config = folder / "slurm.conf"
    config.write_text(
        SLURM_CONF.format(
            folder=folder,
            ctld_port=_free_port(),
            d_port=_free_port(),
            cpus=max(2, os.cpu_count() or 2),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(config)}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(config)], env=env),
        subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(config)], env=env),
    ]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the test SLURM did not come up; see {folder}/*.log")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(timeout=30)


def sbatch(env: dict, *args: str) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(env: dict, job: str) -> str:
    """PENDING, RUNNING, ... or "" once the job has left the queue."""
    result = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def settings(*extra: str) -> list[str]:
    return [item for o in [*SETTINGS, *extra] for item in ("--set", o)]


def test_one_node_job_checkpoints_on_the_warning_requeues_and_resumes(slurm, tmp_path) -> None:
    out, log = tmp_path / "run.h5", tmp_path / "job.out"
    job = sbatch(
        slurm,
        f"--output={log}",
        "slurm/one_node.sbatch",
        "jobs/sine_quick.toml",
        *settings(),
        "--out",
        str(out),
    )
    # Progress lines reach the job's output; warn the job as SLURM's --signal would.
    wait_until(lambda: log.exists() and log.read_text().count("iteration") >= 4, 120, "progress")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_until(lambda: "requeueing job" in log.read_text(), 60, "the requeue")
    wait_until(lambda: job_state(slurm, job) == "PENDING", 60, "the requeued job")
    # A requeued job waits (BeginTime) before it may start again; let it start sooner, but not
    # in the second its old credential was revoked, which slurmd would take for the old one.
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait_until(lambda: job_state(slurm, job) == "", 180, "the job to finish")
    assert f"run file: {out}" in log.read_text(), log.read_text()
    # The same launch line outside SLURM, uninterrupted: the same numbers, to the bit.
    reference = tmp_path / "reference.h5"
    direct = subprocess.run(
        [
            str(BIN / "mpiexec"),
            *("-n", "2", str(BIN / "dmeta"), "run", "jobs/sine_quick.toml"),
            *settings(),
            *("--out", str(reference), "--quiet"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert direct.returncode == 0, direct.stderr
    resumed, expected = read_datasets(out), read_datasets(reference)
    for name in expected:
        if name not in VARYING:
            np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    with h5py.File(out) as f:
        assert f.attrs["complete"] and len(f.attrs["resumed_at_row"]) == 1


def test_sweep_array_writes_one_file_per_element_and_collects_them(slurm, tmp_path) -> None:
    # A row every iteration: the collect step's theorem1.py needs a few steady-state rows.
    settings = [line for line in SMALL if "." not in line and not line.startswith("log_every")]
    (tmp_path / "small.toml").write_text(
        "\n".join(line.replace("=", " = ", 1) for line in [*settings, "log_every=1"])
    )
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('base = "small.toml"\n[vary]\n"optimizer.lr" = [0.001, 0.002, 0.004]\n')
    out_dir = tmp_path / "runs"
    result = subprocess.run(
        ["slurm/submit_sweep.sh", str(sweep), str(out_dir), "analysis/theorem1.py"],
        cwd=ROOT,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    array, collect = words[2], words[-1]
    wait_until(lambda: job_state(slurm, array) == "", 180, "the array job")
    # A failed element cancels the collect job (--kill-on-invalid-dep): no endless wait.
    wait_until(lambda: job_state(slurm, collect) == "", 120, "the collect job")
    logs = "".join(log.read_text() for log in sorted(out_dir.glob("slurm-*.out")))
    files = sorted(out_dir.glob("*.h5"))
    assert [f.name for f in files] == ["lr=0.001.h5", "lr=0.002.h5", "lr=0.004.h5"], logs
    for path in files:
        with h5py.File(path) as f:
            assert f.attrs["complete"]
    assert "complete" in logs and (out_dir / "theorem1.png").is_file(), logs


def test_multi_node_script_runs_with_srun(slurm, tmp_path) -> None:
    out, log = tmp_path / "run.h5", tmp_path / "job.out"
    job = sbatch(
        {**slurm, "DMETA_LAUNCHER": "srun"},
        f"--output={log}",
        "--nodes=1",
        "--ntasks-per-node=2",
        "slurm/multi_node.sbatch",
        "jobs/sine_quick.toml",
        *settings("iterations=20"),
        "--out",
        str(out),
        "--quiet",
    )
    wait_until(lambda: job_state(slurm, job) == "", 180, "the job")
    assert out.exists(), log.read_text()
    with h5py.File(out) as f:
        assert list(f.attrs["agent_counts_per_rank"]) == [4, 3]


def fake_bin(folder: Path, **scripts: str) -> Path:
    """A folder of executable shell scripts, each given by its body."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def test_gpu_script_asks_srun_for_one_rank_per_gpu_and_its_cpus(tmp_path) -> None:
    """No GPU node here: run the script under a fake SLURM environment with a recording srun."""
    record = f'echo "$@" > {tmp_path}/srun.args; echo "$SRUN_CPUS_PER_TASK $OMP_NUM_THREADS" \\\n'
    record += f"  > {tmp_path}/srun.env"
    fake = fake_bin(tmp_path / "bin", srun=record)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "DMETA_VENV": str(BIN.parent),
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "1",
        "SLURM_CPUS_PER_TASK": "4",
    }
    result = subprocess.run(
        ["bash", "slurm/multi_node_gpu.sbatch", "jobs/sine_quick.toml", "--set", "agents=16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    arguments = (tmp_path / "srun.args").read_text().split()
    # SLURM >= 22.05 does not pass sbatch's --cpus-per-task on to srun: the script does.
    assert arguments[:4] == ["--mpi=pmi2", "--cpus-per-task=4", "-n", "8"]
    assert arguments[4:] == [
        "dmeta",
        "run",
        "jobs/sine_quick.toml",
        "--set",
        "runtime.device=auto",
        "--set",
        "agents=16",
    ]
    assert (tmp_path / "srun.env").read_text().split() == ["4", "4"]
    header = (ROOT / "slurm/multi_node_gpu.sbatch").read_text()
    assert "#SBATCH --gpus-per-task=1" in header and "#SBATCH --gpu-bind=single:1" in header
    assert "#SBATCH --cpus-per-task=4" in header


def launch_sh(
    tmp_path: Path, env: dict, script: str = "dmeta_launcher"
) -> subprocess.CompletedProcess:
    """Source slurm/launch.sh under `set -uo pipefail` (as the sbatch scripts do), then run
    `script`; PATH holds only the fake tools given in env."""
    return subprocess.run(
        ["/bin/bash", "-c", f"set -uo pipefail; source slurm/launch.sh || exit 2; {script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("venv_tools", "path_tools", "settings", "expected"),
    [
        # The venv's mpiexec (pip MPICH) first, even inside SLURM with srun at hand.
        (["mpiexec"], ["srun", "mpiexec"], {"SLURM_JOB_ID": "7"}, "{venv}/mpiexec"),
        # A site-MPI install has no venv mpiexec: srun inside an allocation, with its CPUs.
        ([], ["srun", "mpiexec"], {"SLURM_JOB_ID": "7"}, "{path}/srun --mpi=pmi2"),
        (
            [],
            ["srun"],
            {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "3", "DMETA_SRUN_MPI": "pmix"},
            "{path}/srun --mpi=pmix --cpus-per-task=3",
        ),
        # Outside SLURM: mpiexec on PATH.
        ([], ["srun", "mpiexec"], {}, "{path}/mpiexec"),
        # DMETA_LAUNCHER wins: a keyword, or any command used as given.
        (["mpiexec"], ["srun"], {"DMETA_LAUNCHER": "srun"}, "{path}/srun --mpi=pmi2"),
        (
            ["mpiexec"],
            ["mpirun"],
            {"DMETA_LAUNCHER": "mpirun --bind-to none"},
            "mpirun --bind-to none",
        ),
    ],
)
def test_launch_sh_picks_the_launcher(tmp_path, venv_tools, path_tools, settings, expected) -> None:
    venv = fake_bin(tmp_path / "venv/bin", dmeta="", **{name: "" for name in venv_tools})
    path = fake_bin(tmp_path / "path", **{name: "" for name in path_tools})
    env = {"PATH": str(path), "DMETA_VENV": str(venv.parent), **settings}
    result = launch_sh(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.format(venv=venv, path=path)


@pytest.mark.parametrize(
    ("path_tools", "settings", "fragment"),
    [
        ([], {"SLURM_JOB_ID": "7"}, "no launcher"),  # no venv mpiexec, no srun, no mpiexec
        (["mpiexec"], {"DMETA_LAUNCHER": "srun"}, "launcher srun not found"),
        (["srun"], {"DMETA_LAUNCHER": "mpirun -np"}, "launcher mpirun -np not found"),
    ],
)
def test_launch_sh_says_in_one_line_when_no_launcher_is_usable(
    tmp_path, path_tools, settings, fragment
) -> None:
    venv = fake_bin(tmp_path / "venv/bin", dmeta="")
    path = fake_bin(tmp_path / "path", **{name: "" for name in path_tools})
    env = {"PATH": str(path), "DMETA_VENV": str(venv.parent), **settings}
    result = launch_sh(tmp_path, env, "launch_ranks dmeta run x.toml")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_launch_sh_sources_the_site_setup_and_finds_the_venv(tmp_path) -> None:
    venv = fake_bin(tmp_path / "venv/bin", dmeta="", mpiexec="")
    # Site scripts (module, Lmod) may read unset variables; launch.sh keeps its own `set -u`.
    setup = tmp_path / "site.sh"
    setup.write_text('SITE_MODULES="openmpi $UNSET_BY_ANYONE"\nexport SITE_MODULES\n')
    env = {"PATH": "/nonexistent", "DMETA_VENV": str(venv.parent), "DMETA_SETUP": str(setup)}
    shown = 'echo "$SITE_MODULES|$PATH|$OMP_NUM_THREADS|${SRUN_CPUS_PER_TASK-unset}"; echo $NOT_SET'
    result = launch_sh(tmp_path, env, shown)
    assert result.stdout.splitlines() == [f"openmpi |{venv}:/nonexistent|1|unset"]
    assert result.returncode != 0 and "NOT_SET" in result.stderr  # set -u holds again
    # Relative DMETA_VENV is the submit directory's (the repository root's).
    fake_bin(tmp_path / "path", dmeta="")
    env = {"PATH": str(tmp_path / "path"), "DMETA_VENV": "venvs/x", "SLURM_CPUS_PER_TASK": "6"}
    result = launch_sh(tmp_path, env, 'echo "$DMETA_VENV $OMP_NUM_THREADS $SRUN_CPUS_PER_TASK"')
    assert result.stdout.split() == [f"{ROOT}/venvs/x", "6", "6"], result.stderr
    # A missing setup file, or no dmeta anywhere: one line each, status 2.
    for broken, fragment in [
        ({"DMETA_SETUP": str(tmp_path / "missing.sh")}, "is not a file"),
        ({"DMETA_VENV": str(tmp_path / "nowhere")}, "dmeta is not in"),
    ]:
        env = {"PATH": "/nonexistent", "DMETA_VENV": str(venv.parent), **broken}
        result = launch_sh(tmp_path, env, "echo started")
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_submit_sweep_uses_dmeta_venv(tmp_path) -> None:
    """submit_sweep.sh counts the sweep with DMETA_VENV's dmeta and submits two jobs."""
    venv = fake_bin(tmp_path / "venv/bin", dmeta=f'echo "$@" > {tmp_path}/dmeta.args; echo 5')
    record = f'echo "$@" >> {tmp_path}/sbatch.args; wc -l < {tmp_path}/sbatch.args'
    tools = fake_bin(tmp_path / "path", sbatch=record)
    env = {**os.environ, "PATH": f"{tools}:/usr/bin:/bin", "DMETA_VENV": str(venv.parent)}
    out_dir = tmp_path / "runs"
    result = subprocess.run(
        [
            "slurm/submit_sweep.sh",
            "jobs/theorems_mu_sweep.toml",
            str(out_dir),
            "analysis/theorem1.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dmeta.args").read_text().split() == [
        "sweep",
        "jobs/theorems_mu_sweep.toml",
        "--count",
    ]
    array, collect = (tmp_path / "sbatch.args").read_text().splitlines()
    assert "--array=0-4" in array.split() and "slurm/sweep_array.sbatch" in array
    assert "--dependency=afterok:1" in collect.split() and collect.endswith("analysis/theorem1.py")
    assert result.stdout.strip() == f"array job 1 (5 runs into {out_dir}), collect job 2"


def test_every_script_has_the_site_placeholders_and_the_readme_signal() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## SLURM") : readme.index("## Installing against")]
    signals = set(re.findall(r"--signal=B:\w+@\d+", section))
    assert len(signals) == 1, signals
    scripts = sorted((ROOT / "slurm").glob("*.sbatch"))
    assert len(scripts) == 5
    for script in scripts:
        text = script.read_text()
        assert "##SBATCH --account=" in text and "##SBATCH --partition=" in text, script.name
        assert "source slurm/launch.sh || exit 2" in text, script.name
        found = set(re.findall(r"^#SBATCH (--signal=\S+)", text, flags=re.M))
        # Every requeueable script asks for the README's warning; collect.sbatch is short.
        assert found == (signals if "#SBATCH --requeue" in text else set()), script.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_scripts_pass_shellcheck() -> None:
    scripts = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "slurm").iterdir())]
    result = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", *scripts], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_the_scripts_parse() -> None:
    for script in sorted((ROOT / "slurm").iterdir()):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_default_threads_follow_slurm_cpus_per_task_and_the_node_cpus() -> None:
    # srun binds 4 ranks to 4 CPUs each: the node's ranks may run on 16, 4 each.
    assert default_threads(16, 4, {"SLURM_CPUS_PER_TASK": "4"}) == 4
    # A shared node seen whole (64 cores, no cpuset): no more than the job's CPUs per task.
    assert default_threads(64, 4, {"SLURM_CPUS_PER_TASK": "4"}) == 4
    # More ranks than the allocation's CPUs (mpiexec -n 4 inside -c 4 --ntasks=1): one each.
    assert default_threads(4, 4, {"SLURM_CPUS_PER_TASK": "4"}) == 1
    # Outside SLURM: the node's CPUs shared evenly among its ranks, at least one.
    assert default_threads(16, 4, {}) == 4 and default_threads(2, 4, {}) == 1
    assert default_threads(16, 4, {"SLURM_CPUS_PER_TASK": ""}) == 4


def test_plan_run_threads_zero_uses_the_node_cpus(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    config = small_config("runtime.threads=0")
    assert plan_run(config, 1, 0, 0, 1, node_cpus=12).threads == 3
    assert plan_run(config, 1, 0, 0, 1, node_cpus=2).threads == 2
    assert plan_run(small_config("runtime.threads=5"), 1, 0, 0, 1, node_cpus=12).threads == 5
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert plan_run(config, 2, 0, 0, 2, node_cpus=12).threads == 6
