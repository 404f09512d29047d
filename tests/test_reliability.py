"""What happens when things go wrong, through the real stage scripts: bad input, an unreachable tracking
server, divergence, Ctrl-C/SIGTERM and kill -9 with resume."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from vaelab import data
from vaelab.config import Params

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "pipeline" / "train.py"), "data", "models", "reports/history.csv"]


@pytest.fixture(scope="module")
def small_data(mnist, tmp_path_factory) -> Path:
    """Real MNIST, fewer images: 20,000 to train on, so an epoch takes well under a second."""
    folder = tmp_path_factory.mktemp("data")
    train, val = data.split_validation(mnist["train"], 1000, seed=0)
    for name, split in (("train", train), ("val", val), ("test", mnist["test"])):
        data.save_split(data.Split(split.images[:20000], split.labels[:20000]), folder / f"{name}.pt")
    return folder


def _project(root: Path, small_data: Path | None = None, **params) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({**Params(device="cpu", batch_size=250).to_dict(), **params}))
    if small_data is not None:
        shutil.copytree(small_data, root / "data")
    return root


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, **extra}


def _runs(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("vaelab").experiment_id])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"latent_size": 2}, "unknown key 'latent_size'"),
        ({"latent_dim": "2"}, "latent_dim: '2' is not allowed; expected an integer from 1 to 1024"),
        ({"latent_dim": 0}, "latent_dim: 0 is out of range"),
        ({"dropout": 1}, "dropout: 1.0 is out of range; expected a number in [0, 1)"),
        ({"optimizer": "sgd"}, "optimizer: 'sgd' is out of range; expected one of: adam, rmsprop"),
        ({"batch_size": 70000}, "batch_size: 70000 is larger than the training set"),
        ({"epochs": 0}, "epochs: 0 is out of range"),
        ({"lr": -0.1}, "lr: -0.1 is out of range"),
    ],
)
def test_bad_parameters_stop_the_stage_before_anything_is_written(tmp_path, bad, message):
    root = _project(tmp_path / "project", **bad)
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # no outputs, no MLflow store


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_a_damaged_mnist_file_is_named_and_nothing_is_prepared(tmp_path, damaged_mirror, damage):
    mirror = damaged_mirror("train-labels-idx1-ubyte.gz", damage)
    root = _project(tmp_path / "project")
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "prepare.py"), "data/raw", "data/prepared"],
        cwd=root, env=_env(VAELAB_MNIST_MIRROR=str(mirror)), capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "train-labels-idx1-ubyte.gz" in result.stderr and "md5" in result.stderr
    assert not (root / "data" / "prepared").exists()


def test_preparing_twice_gives_byte_identical_files_so_dvc_sees_no_change(tmp_path, mnist_dir):
    root = _project(tmp_path / "project")
    prepared = []
    for out in ("first", "second"):
        subprocess.run([sys.executable, str(REPO / "pipeline" / "prepare.py"), "data/raw", out], cwd=root,
                       env=_env(VAELAB_MNIST_MIRROR=str(mnist_dir)), check=True, capture_output=True)
        prepared.append({p.name: p.read_bytes() for p in (root / out).iterdir()})
    assert sorted(prepared[0]) == ["test.pt", "train.pt", "val.pt"] and prepared[0] == prepared[1]


def test_an_unwritable_output_folder_is_named_before_any_work(tmp_path, small_data):
    root = _project(tmp_path / "project", small_data)
    (root / "reports").write_text("a file where the reports folder should be")
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "cannot write the output reports/history.csv" in result.stderr
    assert not (root / "models").exists() and not (root / "mlflow.db").exists()


def test_an_unreachable_tracking_server_fails_fast_before_training(tmp_path, small_data):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = _project(tmp_path / "project", small_data)
    start = time.monotonic()
    result = subprocess.run(TRAIN, cwd=root, env=_env(MLFLOW_TRACKING_URI=f"http://user:secret@127.0.0.1:{port}"),
                            capture_output=True, text=True)
    assert time.monotonic() - start < 15
    assert result.returncode == 2 and "does not answer" in result.stderr
    assert "secret" not in result.stderr + result.stdout
    assert not (root / "models").exists()


def test_divergence_stops_training_marks_the_run_failed_and_publishes_no_model(tmp_path, small_data):
    root = _project(tmp_path / "project", small_data, lr=10.0, epochs=3)
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "at epoch 1, step" in result.stderr, result.stderr
    assert not (root / "models" / "vae.pt").exists()
    _, runs = _runs(root)
    assert [run.info.status for run in runs] == ["FAILED"]


STARTS_A_RUN = """
from vaelab import tracking
from vaelab.config import Params
with tracking.training_run(Params()) as run:
    run.log_epoch({"epoch": 1, "val_neg_elbo": 150.0})
"""


def test_workers_starting_together_on_a_new_sqlite_store_all_get_complete_runs_in_one_experiment(tmp_path):
    """As `dvc queue start -j 4` does on a fresh clone: the first writers race to create MLflow's tables
    and the experiment."""
    workers = [subprocess.Popen([sys.executable, "-c", STARTS_A_RUN], cwd=tmp_path, env=_env(DVC_ROOT=str(tmp_path)),
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, "\n".join(errors)
    client, runs = _runs(tmp_path)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "vaelab"] and len(runs) == 4
    assert all(run.info.status == "FINISHED" and run.data.metrics["val_neg_elbo"] == 150.0 for run in runs)


def _start_and_wait_for_checkpoint(root: Path) -> subprocess.Popen:
    process = subprocess.Popen(TRAIN, cwd=root, env=_env(VAELAB_CHECKPOINT_SECONDS="0"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((root / ".vaelab").glob("checkpoints/*/state.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    return process


def test_sigterm_marks_the_run_killed_and_leaves_no_model(tmp_path, small_data):
    root = _project(tmp_path / "project", small_data, epochs=30)
    process = _start_and_wait_for_checkpoint(root)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert "SIGTERM" in process.stderr.read()
    _, runs = _runs(root)
    assert [run.info.status for run in runs] == ["KILLED"]
    assert not (root / "models" / "vae.pt").exists()


def test_after_kill_9_the_same_experiment_resumes_its_run_and_ends_bit_for_bit_as_an_uninterrupted_one(
    tmp_path, small_data
):
    settings = dict(epochs=8, latent_dim=3)
    whole = _project(tmp_path / "whole", small_data, **settings)
    subprocess.run(TRAIN, cwd=whole, env=_env(VAELAB_CHECKPOINT_SECONDS="0"), check=True, capture_output=True)

    root = _project(tmp_path / "killed", small_data, **settings)
    process = _start_and_wait_for_checkpoint(root)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    client, runs = _runs(root)
    assert [run.info.status for run in runs] == ["RUNNING"]  # what kill -9 leaves behind
    [state] = (root / ".vaelab").glob("checkpoints/*/state.pt")
    assert 1 <= torch.load(state, weights_only=True)["epoch"] < settings["epochs"]

    subprocess.run(TRAIN, cwd=root, env=_env(), check=True, capture_output=True)
    _, after = _runs(root)
    assert [(run.info.run_id, run.info.status) for run in after] == [(runs[0].info.run_id, "FINISHED")]
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_neg_elbo")}
    assert steps == set(range(1, settings["epochs"] + 1))
    resumed = torch.load(root / "models" / "vae.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(whole / "models" / "vae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert (root / "reports" / "history.csv").read_text() == (whole / "reports" / "history.csv").read_text()
    assert not list((root / ".vaelab" / "checkpoints").iterdir())  # cleaned up once the outputs exist


def _train(root: Path) -> None:
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_killed_with_9_is_closed_by_the_next_training_whatever_its_parameters_and_resumes_later(
    tmp_path, small_data
):
    """A crash leaves a run RUNNING; the next training on this host, even of other parameters, marks it
    KILLED, and its checkpoint still resumes it into the same run when its parameters train again."""
    root = _project(tmp_path / "project", small_data, epochs=12)
    process = _start_and_wait_for_checkpoint(root)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    client, [killed] = _runs(root)
    assert killed.info.status == "RUNNING"

    (root / "params.yaml").write_text(yaml.safe_dump({**Params(device="cpu", batch_size=250).to_dict(), "epochs": 2}))
    _train(root)
    _, runs = _runs(root)
    [other] = [run for run in runs if run.info.run_id != killed.info.run_id]
    assert {run.info.run_id: run.info.status for run in runs} == {killed.info.run_id: "KILLED",
                                                                    other.info.run_id: "FINISHED"}
    assert list((root / ".vaelab").glob("checkpoints/*/state.pt"))  # the killed run's checkpoint is kept

    (root / "params.yaml").write_text(yaml.safe_dump({**Params(device="cpu", batch_size=250).to_dict(), "epochs": 12}))
    _train(root)
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "val_neg_elbo")]
    assert sorted(steps) == list(range(1, 13))  # every epoch once, across the kill
    assert len(_runs(root)[1]) == 2


def test_a_dropout_too_high_to_train_is_named_as_the_cause(tmp_path, small_data):
    """dropout: 0.99999 passes validation but scales the few kept units by 65,536: the message says so."""
    root = _project(tmp_path / "project", small_data, dropout=0.99999, epochs=1)
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dropout 0.99999 keeps 0.001% of the units" in result.stderr and "use a dropout below 0.95" in result.stderr
    assert not (root / "models" / "vae.pt").exists()
