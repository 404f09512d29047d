"""`vaelab slurm` against a real Slurm (tests/slurm_cluster.py: munged, slurmctld and two slurmd on this machine)
and a real MLflow server on loopback: a 2 x 2 grid submitted, the code broken by a commit right after, one task
requeued mid-training and one cancelled, then resubmitted; and each refusal, with nothing submitted."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from projects import free_port, http_service, new_project, user_env
from slurm_cluster import missing, slurm_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(missing()), reason=missing() or "")]

GRID = ["-S", "latent_dim=2,3", "-S", "seed=0,1"]
POINTS = [{"latent_dim": 2, "seed": 0}, {"latent_dim": 2, "seed": 1}, {"latent_dim": 3, "seed": 0},
          {"latent_dim": 3, "seed": 1}]
EPOCHS = 8  # long enough to requeue a task after its second epoch's checkpoint


@pytest.fixture(scope="module")
def cluster(module_tmp_path, mnist_dir):
    """The cluster, a tracking server, and a workspace whose user's shell points at both."""
    port = free_port()
    server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
              f"sqlite:///{module_tmp_path / 'server.db'}", "--artifacts-destination",
              str(module_tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with slurm_cluster(module_tmp_path / "slurm") as slurm, http_service(
            server, f"http://127.0.0.1:{port}", module_tmp_path, user_env(mnist_dir), module_tmp_path / "mlflow.log"
    ) as url:
        (module_tmp_path / "ws").mkdir()
        env = user_env(mnist_dir, MLFLOW_TRACKING_URI=url, VAELAB_CHECKPOINT_SECONDS="0",
                       VAELAB_SCRATCH=str(module_tmp_path / "scratch"), **slurm.env)
        (module_tmp_path / "scratch").mkdir()
        project = new_project(module_tmp_path / "ws", env, epochs=EPOCHS)
        yield slurm, project, url


def _wait(condition, what: str, timeout: float, slurm) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout} s:\n{slurm.run('squeue', check=False)}\n"
                                 f"{slurm.logs()}")
        time.sleep(0.2)


def _checkpoint_epoch(checkpoints: Path, point: dict) -> int:
    """The epoch of the checkpoint a training of `point` keeps now (0 for none)."""
    import torch

    for key_file in checkpoints.glob("*/key.json"):
        params = json.loads(key_file.read_text())["params"]
        if all(params[name] == value for name, value in point.items()) and (key_file.parent / "state.pt").exists():
            try:
                return torch.load(key_file.parent / "state.pt", map_location="cpu", weights_only=True)["epoch"]
            except Exception:  # being replaced this moment
                return 0
    return 0


def _queued(slurm, job: str) -> bool:
    return bool(slurm.run("squeue", "-h", "-j", job, check=False).strip())


@pytest.fixture(scope="module")
def grid(cluster):
    """Submit the grid; break the code by a commit; requeue task 0 after its second epoch; cancel task 3 before it
    starts; wait for the rest, resubmit what failed, and wait again."""
    slurm, project, url = cluster
    submitted = project.run("git", "rev-parse", "HEAD").strip()
    out = project.run("vaelab", "slurm", "submit", *GRID, "--max-running", "2", "--time", "30:00")
    job = re.search(r"Submitted Slurm job (\d+): 4 experiments of commit (\w+)", out).group(1)
    model = project / "src/vaelab/model.py"
    model.write_text("raise ImportError('broken on purpose')\n" + model.read_text())
    project.run("git", "commit", "-qam", "a change that breaks the package")
    slurm.run("scancel", f"{job}_3")
    checkpoints = project / ".vaelab" / "checkpoints"
    _wait(lambda: _checkpoint_epoch(checkpoints, POINTS[0]) >= 2, "task 0's second checkpoint", 600, slurm)
    slurm.run("scontrol", "requeue", f"{job}_0")
    _wait(lambda: not _queued(slurm, job), "the grid's end", 1200, slurm)
    before = project.run("vaelab", "slurm", "status", job)
    again = project.run("vaelab", "slurm", "resubmit", job)
    second = re.search(r"Submitted Slurm job (\d+)", again).group(1)
    _wait(lambda: not _queued(slurm, second), "the resubmitted point's end", 900, slurm)
    return {"job": job, "second": second, "commit": submitted, "submit_out": out, "status_before": before,
            "status_after": project.run("vaelab", "slurm", "status", job)}


def _runs(url: str, job: str) -> list:
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("vaelab")
    return client.search_runs([experiment.experiment_id], f"tags.`vaelab.slurm.job` = '{job}'")


def test_the_grid_arrives_as_four_experiments_and_mlflow_runs_of_the_submitted_commit_on_both_nodes(cluster, grid):
    slurm, project, url = cluster
    assert "follow them:  vaelab slurm status" in grid["submit_out"]
    runs = _runs(url, grid["job"]) + _runs(url, grid["second"])
    by_point = {(int(run.data.params["latent_dim"]), int(run.data.params["seed"])): run for run in runs}
    assert len(runs) == 4 and set(by_point) == {(p["latent_dim"], p["seed"]) for p in POINTS}
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags["mlflow.source.git.commit"] for run in runs} == {grid["commit"]}
    assert {run.data.tags["vaelab.slurm.node"] for run in runs} == {"n1", "n2"}
    assert {run.data.tags["vaelab.torch_threads"] for run in runs} == {"1"}  # the task's one CPU
    assert "test/iwae_nll" in by_point[(3, 1)].data.metrics  # evaluated too

    shown = json.loads(project.run("dvc", "exp", "show", "--json", "--rev", grid["commit"]))
    experiments = {exp["name"]: exp["data"] for row in shown for exp in row.get("experiments") or []
                   for exp in exp["revs"]}
    names = {f"slurm-{grid['job']}-{task}" for task in range(3)} | {f"slurm-{grid['second']}-0"}
    assert names <= set(experiments)
    for task, point in enumerate(POINTS):
        name = f"slurm-{grid['job']}-{task}" if task < 3 else f"slurm-{grid['second']}-0"
        params = experiments[name]["params"]["params.yaml"]["data"]
        assert {key: params[key] for key in point} == point and params["epochs"] == EPOCHS
        assert experiments[name]["metrics"]["reports/metrics.json"]["data"]["test_neg_elbo"] > 0
        weights = experiments[name]["outs"]["models"]["hash"].removesuffix(".dir")  # in the workspace's DVC cache
        assert (project / ".dvc/cache/files/md5" / weights[:2] / f"{weights[2:]}.dir").exists()

    assert "3 arrived, 0 pending or running, 1 failed or lost" in grid["status_before"]
    [cancelled] = [line.split() for line in grid["status_before"].splitlines() if f" {grid['job']}_3 " in line]
    assert cancelled[2:4] == [f"{grid['job']}_3", "ENDED"] and cancelled[4] == "-"  # Slurm forgets a cancelled pending task
    assert f"vaelab slurm resubmit {grid['job']}" in grid["status_before"]
    assert "4 arrived, 0 pending or running, 0 failed or lost" in grid["status_after"]
    assert max(map(len, grid["status_after"].splitlines())) <= 110


def test_timings_split_each_task_into_queue_clone_stages_dvc_and_push(cluster, grid):
    slurm, project, url = cluster
    out = project.run("vaelab", "slurm", "timings", grid["job"])
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"\d+_\d ", line)}
    assert set(rows) == {f"{grid['job']}_{task}" for task in range(3)} | {f"{grid['second']}_0"}
    for row in rows.values():
        wait, clone, prepare, train, evaluate, render, dvc, push, overhead = map(float, row[2:11])
        assert min(wait, clone, dvc, push) >= 0 and train > 0 and evaluate > 0 and render > 0
        assert overhead == pytest.approx(clone + dvc + push, abs=0.15)
    assert "the first epoch ended" in out and max(map(len, out.splitlines())) <= 120


def test_a_requeued_task_resumes_and_ends_as_a_local_dvc_exp_run_of_its_point_does(cluster, grid):
    slurm, project, url = cluster
    log = (project / ".vaelab" / "slurm" / "logs" / f"{grid['job']}_0.log").read_text()
    assert "restart 1: start" in log and "resumed from its checkpoint at epoch" in log
    [run] = [run for run in _runs(url, grid["job"]) if run.data.tags["vaelab.slurm.task"] == "0"]
    assert run.data.tags["vaelab.slurm.restarts"] == "1"
    assert [m.step for m in MlflowClient(url).get_metric_history(run.info.run_id, "learning_curve/val_neg_elbo")] == list(
        range(1, EPOCHS + 1))  # each epoch once, across the requeue

    project.run("git", "checkout", "-q", grid["commit"])
    try:
        env = {**project.env, "OMP_NUM_THREADS": "1"}
        subprocess.run(["dvc", "exp", "run", "--name", "local-twin", "-S", "latent_dim=2", "-S", "seed=0"],
                       cwd=project.root, env=env, check=True, capture_output=True, timeout=900)
        shown = json.loads(project.run("dvc", "exp", "show", "--json", "--rev", grid["commit"]))
        metrics = {exp["name"]: exp["data"]["metrics"]["reports/metrics.json"]["data"]
                   for row in shown for exp in row.get("experiments") or [] for exp in exp["revs"]}
    finally:
        project.run("git", "checkout", "-q", "-f", "main")
    assert metrics[f"slurm-{grid['job']}-0"] == metrics["local-twin"]


def test_nodes_that_cannot_reach_the_workspace_clone_from_and_push_to_its_git_and_dvc_remotes(cluster, tmp_path,
                                                                                              mnist_dir):
    slurm, project, url = cluster
    remote = new_project(tmp_path / "ws", project.env, epochs=2)
    remote.run("git", "init", "-q", "--bare", str(tmp_path / "origin.git"))
    remote.run("git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    assert "push it first (git push origin)" in _refused(remote, "--remote", "origin")
    remote.run("dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-storage"))
    remote.run("git", "commit", "-qam", "a DVC remote")
    remote.run("git", "push", "-q", "origin", "main")
    out = remote.run("vaelab", "slurm", "submit", "-S", "latent_dim=5", "--remote", "origin")
    job = re.search(r"Submitted Slurm job (\d+)", out).group(1)
    assert "dvc exp pull origin" in out
    _wait(lambda: not _queued(slurm, job), "the remote grid's end", 600, slurm)
    assert f"slurm-{job}-0" not in remote.run("dvc", "exp", "list", "--name-only")  # it went to the remotes
    assert "1 arrived, 0 pending or running, 0 failed or lost" in remote.run("vaelab", "slurm", "status")  # found there
    remote.run("dvc", "exp", "pull", "origin", f"slurm-{job}-0")
    remote.run("dvc", "exp", "apply", f"slurm-{job}-0")
    assert json.loads((remote / "reports/metrics.json").read_text())["test_neg_elbo"] > 0
    assert (remote / "models/vae.pt").stat().st_size > 0  # the outputs came from the DVC remote
    [run] = _runs(url, job)
    assert run.data.params["latent_dim"] == "5" and run.info.status == "FINISHED"


def _refused(project, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(["vaelab", "slurm", "submit", *args], cwd=project.root, env=env or project.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    return line


def test_each_refusal_is_one_line_and_submits_nothing(cluster, tmp_path):
    slurm, project, url = cluster
    jobs_before = slurm.run("scontrol", "show", "job", check=False)
    records = sorted((project / ".vaelab" / "slurm").glob("*.json"))

    assert _refused(project, "-S", "latent_dim=2,0") == (
        "error: the point latent_dim=0: params.yaml: latent_dim: 0 is out of range; expected an integer from 1 to "
        "1024; nothing was submitted")
    assert _refused(project, "-S", "seed=5", "--partition", "nowhere") == (
        "error: sbatch refused the grid: Batch job submission failed: Invalid partition name specified; nothing was "
        "submitted")
    no_slurm = tmp_path / "bin"
    no_slurm.mkdir()
    (no_slurm / "git").symlink_to(subprocess.run(["which", "git"], capture_output=True, text=True).stdout.strip())
    line = _refused(project, "-S", "seed=5", env={**project.env, "PATH": f"{Path(sys.executable).parent}:{no_slurm}"})
    assert "sbatch not found" in line and "dvc queue" in line
    line = _refused(project, "-S", "seed=5", env={k: v for k, v in project.env.items() if k != "MLFLOW_TRACKING_URI"})
    assert "sqlite:///" in line and "docs/team.md" in line
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("dropout: 0.3", "dropout: 0.2"))
    try:
        assert "uncommitted changes to params.yaml" in _refused(project, "-S", "seed=5")
    finally:
        project.run("git", "checkout", "params.yaml")

    dry = project.run("vaelab", "slurm", "submit", "-S", "seed=5,6", "--gpus-per-task", "1", "--dry-run", "--",
                      "--mem=1G")
    assert "#SBATCH --array=0-1\n" in dry and "#SBATCH --gpus-per-task=1\n" in dry and "--requeue" in dry
    assert "  1) set -- -S seed=6 ;;" in dry and "#   task 1: seed=6" in dry and "sbatch --parsable --mem=1G" in dry

    assert slurm.run("scontrol", "show", "job", check=False) == jobs_before
    assert sorted((project / ".vaelab" / "slurm").glob("*.json")) == records
