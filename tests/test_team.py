"""The team set-up the README describes, end to end: an `mlflow server` on a real PostgreSQL store with its
own artifact root, on loopback, and a git remote with a DVC directory remote beside it. One machine (a
clone) trains and pushes; a second clone pulls the data, the models and the experiment without retraining,
and compares the runs from the same server."""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from projects import SMALL, Project, free_port, http_service, new_project, user_env

pytestmark = pytest.mark.e2e
PASSWORD = "team-secret"


def _postgres_bin() -> Path:
    """Debian's PostgreSQL server programs (package postgresql)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's postgresql (.ci/run installs it)")
        pytest.skip("needs Debian's PostgreSQL: apt-get install postgresql")
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 with password authentication and a database `mlflow`.
    PostgreSQL refuses to run as root, so under root it runs as the package's `postgres` user."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="vaelab-postgres-"))  # pytest's own temp folder is closed to others
    as_owner = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    password_file = folder / "password"
    password_file.write_text(PASSWORD + "\n")
    if as_owner:
        shutil.chown(password_file, "postgres")
    port = free_port()

    def server(*command: str) -> None:
        subprocess.run([*as_owner, *command], check=True, capture_output=True, timeout=120)

    server(str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "vaelab", f"--pwfile={password_file}",
           "--auth=scram-sha-256", "--encoding=UTF8")
    server(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w", "start",
           "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}")
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vaelab", "mlflow"],
                       env={**os.environ, "PGPASSWORD": PASSWORD}, check=True, capture_output=True)
        yield f"postgresql://vaelab:{PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        server(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _psql(database_uri: str, query: str) -> str:
    return subprocess.run(["psql", database_uri, "-tAc", query], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def team(postgres, module_tmp_path, mnist_dir):
    """The shared places: the tracking server (as the README starts it), a bare git repository, a DVC remote."""
    shared = module_tmp_path / "shared"
    shared.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
               "--artifacts-destination", str(shared / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(shared / "origin.git")], check=True)
    with http_service(command, f"http://127.0.0.1:{port}", shared, user_env(mnist_dir), shared / "server.log") as url:
        yield {"tracking_uri": url, "database": postgres, "artifacts": shared / "artifacts",
               "git": shared / "origin.git", "dvc_remote": shared / "dvc-remote"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_machine(team, module_tmp_path, mnist_dir):
    """Train the baseline and one experiment against the server, then share them: git push, dvc push,
    dvc exp push."""
    machine = new_project(module_tmp_path / "machine-a",
                          user_env(mnist_dir, MLFLOW_TRACKING_URI=team["tracking_uri"]))
    machine.run("dvc", "remote", "add", "--default", "shared", str(team["dvc_remote"]))
    machine.run("git", "remote", "add", "origin", str(team["git"]))
    machine.run("dvc", "repro")
    machine.run("dvc", "push")
    machine.run("git", "add", "-A")
    machine.run("git", "commit", "-qm", "baseline model")
    machine.run("git", "push", "-q", "origin", "main")
    machine.baseline_model = _sha256(machine / "models" / "vae.pt")
    machine.run("dvc", "exp", "run", "-S", "latent_dim=3", "--name", "wide")
    machine.run("dvc", "exp", "push", "origin", "wide")
    machine.wide_model = _sha256(machine / "models" / "vae.pt")
    return machine


def test_runs_live_in_postgresql_and_their_artifacts_in_the_servers_artifact_root(team, first_machine):
    client = MlflowClient(team["tracking_uri"])
    experiment = client.get_experiment_by_name("vaelab")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.params["latent_dim"] for r in runs] == ["2", "3"]
    assert all(r.info.status == "FINISHED" and "test/iwae_nll" in r.data.metrics for r in runs)
    assert runs[1].data.tags["dvc.exp_name"] == "wide"
    assert _psql(team["database"], "select count(*) from runs") == "2"  # the server's store is PostgreSQL
    assert _psql(team["database"], "select count(distinct step) from metrics where key = 'learning_curve/val_neg_elbo'") == "3"

    for run in runs:  # proxied by the server: clients need no access to the artifact root themselves
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        [stored] = team["artifacts"].rglob(f"{run.info.run_id}/artifacts/figures/manifold.gif")
        with Image.open(stored) as gif:
            assert gif.n_frames == SMALL["epochs"]  # a frame of the manifold at each epoch
    # the last run's GIF is the one its render stage drew in the workspace, byte for byte
    assert stored.read_bytes() == (first_machine / "reports" / "figures" / "manifold.gif").read_bytes()
    mlflow.set_tracking_uri(team["tracking_uri"])
    decoder = mlflow.pyfunc.load_model(f"runs:/{runs[1].info.run_id}/model")
    assert decoder.predict(np.zeros((1, 3), dtype=np.float32)).shape == (1, 28, 28)


def test_a_second_machine_pulls_data_models_and_experiments_without_retraining(team, first_machine, tmp_path,
                                                                               mnist_dir):
    root = tmp_path / "vaelab"
    subprocess.run(["git", "clone", "-q", str(team["git"]), str(root)], check=True)
    machine = Project(root, user_env(mnist_dir, MLFLOW_TRACKING_URI=team["tracking_uri"]))
    machine.run("dvc", "pull")
    assert _sha256(machine / "models" / "vae.pt") == first_machine.baseline_model
    assert "up to date" in machine.run("dvc", "status")  # nothing to re-run

    machine.run("dvc", "exp", "pull", "origin", "wide")
    assert "wide" in machine.run("dvc", "exp", "list", "--name-only").split()
    machine.run("dvc", "exp", "apply", "wide")
    assert _sha256(machine / "models" / "vae.pt") == first_machine.wide_model
    assert "up to date" in machine.run("dvc", "status")

    out = machine.run("vaelab", "compare", "--no-log")  # the same runs, read from the team's server
    assert "2 runs compared" in out and (machine / "reports" / "compare" / "manifolds.png").exists()
