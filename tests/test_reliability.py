"""What happens when things go wrong, through the real stage scripts: bad input, an unreachable tracking
server, divergence, Ctrl-C/SIGTERM and kill -9 with resume, a damaged input file."""
import hashlib
import os
import re
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

from vaelab import data, handoff, stages, tracking
from vaelab.config import Params
from projects import free_port, http_service

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "pipeline" / "train.py"), "data", "models", "reports/history.csv"]


@pytest.fixture(scope="module")
def small_data(mnist, module_tmp_path) -> Path:
    """Real MNIST, fewer images: 20,000 to train on, so an epoch takes well under a second."""
    folder = module_tmp_path / "data"
    folder.mkdir()
    train, val = data.split_validation(mnist["train"], 1000, seed=0)
    for name, split in (("train", train), ("val", val), ("test", mnist["test"])):
        data.save_split(data.Split(split.images[:20000], split.labels[:20000]), folder / f"{name}.pt")
    return folder


@pytest.fixture
def start_training():
    """Starts the train stage as a process; one that a failed test leaves running is killed at its end."""
    started = []

    def start(root: Path, env: dict[str, str], **popen) -> subprocess.Popen:
        started.append(subprocess.Popen(TRAIN, cwd=root, env=env, **popen))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


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
        ({"conditional": "yes"}, "conditional: 'yes' is not allowed; expected true or false"),
        ({"conditional": 1}, "conditional: 1 is not allowed; expected true or false"),
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
    assert sorted(prepared[0]) == ["split.json", "test.pt", "train.pt", "val.pt"] and prepared[0] == prepared[1]


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
    assert all(run.info.status == "FINISHED" and run.data.metrics["learning_curve/val_neg_elbo"] == 150.0
               for run in runs)


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
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "learning_curve/val_neg_elbo")}
    assert steps == set(range(1, settings["epochs"] + 1))
    resumed = torch.load(root / "models" / "vae.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(whole / "models" / "vae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert (root / "reports" / "history.csv").read_text() == (whole / "reports" / "history.csv").read_text()
    assert not list((root / ".vaelab" / "checkpoints").iterdir())  # cleaned up once the outputs exist


def test_a_torn_checkpoint_after_kill_9_is_named_and_the_stage_trains_afresh_in_a_new_run(tmp_path, small_data):
    """The torn file a power cut can leave: one warning line naming it, then a whole training in a run of its own;
    the killed run is closed, not continued with epochs it never had."""
    root = _project(tmp_path / "project", small_data, epochs=6)
    process = _start_and_wait_for_checkpoint(root)
    process.kill()
    process.wait()
    [state] = (root / ".vaelab").glob("checkpoints/*/state.pt")
    state.write_bytes(state.read_bytes()[:100])
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "checkpoint" in line]
    assert warnings == [f"warning: the checkpoint {state} is a truncated PyTorch archive; training starts afresh"]
    client, runs = _runs(root)
    assert sorted(run.info.status for run in runs) == ["FINISHED", "KILLED"]
    [finished] = [run for run in runs if run.info.status == "FINISHED"]
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "learning_curve/val_neg_elbo")]
    assert steps == list(range(1, 7))


def test_two_trainings_of_the_same_parameters_at_once_keep_their_own_checkpoint_and_run(tmp_path, small_data):
    """Two queue workers on the same point of a grid queued twice (DVC_ROOT: the workspace both share): each holds a
    checkpoint folder and an MLflow run of its own, neither removes the other's, and both end as one training."""
    shared = tmp_path / "workspace"
    shared.mkdir()
    env = _env(DVC_ROOT=str(shared), VAELAB_CHECKPOINT_SECONDS="0")
    roots = [_project(tmp_path / name, small_data, epochs=8) for name in ("first", "second")]
    processes = [subprocess.Popen(TRAIN, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for root in roots]
    try:
        _wait_for(lambda: len(list(shared.glob(".vaelab/checkpoints/*/state.pt"))) == 2, "two checkpoints")
        assert all(process.poll() is None for process in processes)  # both at once, each in its own folder
    finally:
        errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    client, runs = _runs(shared)
    assert len({run.info.run_id for run in runs}) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "learning_curve/val_neg_elbo")]
        assert sorted(steps) == list(range(1, 9))
    first, second = (torch.load(root / "models" / "vae.pt", weights_only=True)["state_dict"] for root in roots)
    assert all(torch.equal(first[name], second[name]) for name in first)  # the same training, twice
    assert not list(shared.glob(".vaelab/checkpoints/*/state.pt"))


def test_a_checkpoint_of_other_code_is_named_and_not_resumed(tmp_path, small_data):
    """The code a training runs is part of what its checkpoint is for: after an edit to the library, a stopped
    training starts afresh in a new run, one line says why, and the old checkpoint stays for that code."""
    root = _project(tmp_path / "project", small_data, epochs=6)
    for folder in ("pipeline", "src"):  # the stage as dvc.yaml runs it, on a copy of the library that can change
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    stage = [sys.executable, "pipeline/train.py", *TRAIN[2:]]
    env = _env(PYTHONPATH=str(root / "src"), VAELAB_CHECKPOINT_SECONDS="0")
    process = subprocess.Popen(stage, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: list(root.glob(".vaelab/checkpoints/*/state.pt")), "a checkpoint", process)
    process.kill()
    process.wait()
    [old] = [path.parent for path in root.glob(".vaelab/checkpoints/*/state.pt")]
    with open(root / "src" / "vaelab" / "training.py", "a") as code:
        code.write("# an edit\n")

    result = subprocess.run(stage, cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "checkpoint" in line]
    assert notes == [f"note: the checkpoint {old} of these parameters is not resumed: it was made by other code "
                     "(src/vaelab/training.py differs); training starts afresh"]
    assert "resumed" not in result.stdout
    client, runs = _runs(root)
    [finished] = [run for run in runs if run.info.status == "FINISHED"]
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "learning_curve/val_neg_elbo")]
    assert sorted(steps) == list(range(1, 7)) and len(runs) == 2
    assert (old / "state.pt").exists()  # kept for the code that made it


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
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "learning_curve/val_neg_elbo")]
    assert sorted(steps) == list(range(1, 13))  # every epoch once, across the kill
    assert len(_runs(root)[1]) == 2


def test_a_dropout_too_high_to_train_is_named_as_the_cause(tmp_path, small_data):
    """dropout: 0.99999 passes validation but scales the few kept units by 65,536: the message says so."""
    root = _project(tmp_path / "project", small_data, dropout=0.99999, epochs=1)
    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dropout 0.99999 keeps 0.001% of the units" in result.stderr and "use a dropout below 0.95" in result.stderr
    assert not (root / "models" / "vae.pt").exists()


def _mlflow_server(store: Path, port: int):
    """A real `mlflow server` on a SQLite store, as a team runs one; stopped when the block ends."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
               str(store / "artifacts"), "--workers", "1"]
    store.mkdir(exist_ok=True)
    return http_service(command, f"http://127.0.0.1:{port}", store, _env(), store / "server.log")


def _wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, f"training ended before {what}"
        time.sleep(0.2)


def _epochs_logged(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Each training metric's logged steps (not the machine's use, system/*, whose step counts seconds)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def _server_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("vaelab")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _assert_delivered_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = _epochs_logged(client, run_id)
    assert {"learning_curve/train_neg_elbo", "learning_curve/val_neg_elbo", "train_schedule/lr"} <= set(logged)
    assert all(steps == list(range(1, epochs + 1)) for steps in logged.values()), logged  # each epoch once
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    assert [str(model.status) for model in models] == ["READY"]  # the model, logged once
    inputs = sorted((i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs)
    assert inputs == [("mnist-train", "training"), ("mnist-val", "validation")]  # the data sets, once each


@pytest.mark.parametrize("epochs, back_after", [(40, "does not answer"), (30, "trying again for up to")],
                         ids=["back-during-training", "back-after-the-last-epoch"])
def test_a_tracking_server_restarted_mid_training_stops_nothing_and_gets_every_epoch_once(
    tmp_path, small_data, start_training, epochs, back_after
):
    """The server goes down while training runs and comes back, before or after the last epoch: training goes
    on, says that the server is away and when it is back, and the server ends with every epoch's metrics
    exactly once, the model, and a FINISHED run."""
    root, store, port = _project(tmp_path / "project", small_data, epochs=epochs), tmp_path / "server", free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "train.log"
    with _mlflow_server(store, port):
        client = MlflowClient(url)
        with open(log, "w") as output:
            process = start_training(root, _env(MLFLOW_TRACKING_URI=url), stdout=output, stderr=output)
        _wait_for(lambda: (runs := _server_runs(client)) and _epochs_logged(client, runs[0].info.run_id),
                  "the first metrics", process)
    _wait_for(lambda: back_after in log.read_text(), f"'{back_after}'", process)
    with _mlflow_server(store, port):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
        [run] = _server_runs(client)
        _assert_delivered_once(client, run.info.run_id, epochs)
    assert "answers again; the waiting metrics are sent" in log.read_text()
    assert not list((root / ".vaelab" / "checkpoints").iterdir())


def test_a_tracking_server_gone_for_good_fails_in_one_line_and_a_later_run_delivers_without_training(
    tmp_path, small_data, start_training
):
    root, store, port, epochs = _project(tmp_path / "project", small_data, epochs=6), tmp_path / "server", free_port(), 6
    url = f"http://127.0.0.1:{port}"
    with _mlflow_server(store, port):
        client = MlflowClient(url)
        process = start_training(root, _env(MLFLOW_TRACKING_URI=url, VAELAB_TRACKING_PATIENCE_SECONDS="8"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _server_runs(client), "the run", process)
        [run] = _server_runs(client)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    [error] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"the MLflow tracking server {url} did not answer for 8 s (connection refused)" in error
    # the data sets wait too unless the sender's first flush, 10 s in, beat the server's end
    assert re.search(r"epochs of metrics, (the run's data sets, )?the model, the run's end \(FINISHED\)", error)
    assert run.info.run_id in error
    assert "dvc repro" in error and "skip the training" in error
    assert all((root / path).exists() for path in ("models/vae.pt", "models/run.json", "reports/history.csv"))
    [state] = (root / ".vaelab").glob("checkpoints/*/state.pt")
    assert torch.load(state, weights_only=True)["epoch"] == epochs
    weights = (root / "models" / "vae.pt").read_bytes()

    with _mlflow_server(store, port):
        result = subprocess.run(TRAIN, cwd=root, env=_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"epoch {epochs} (resumed from its checkpoint at epoch {epochs})" in result.stdout
        _assert_delivered_once(client, run.info.run_id, epochs)
    assert (root / "models" / "vae.pt").read_bytes() == weights
    assert not list((root / ".vaelab" / "checkpoints").iterdir())


LOCKS_THE_STORE = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_sqlite_store_locked_past_the_bound_fails_in_one_line_and_loses_nothing(tmp_path, small_data, start_training):
    """A person's sqlite3 shell holds the store in a write transaction from just after the run opened. The
    patience outlasts SQLite's own wait (MLflow's busy timeout, 20 s), so MLflow meets the lock and logs it;
    what the user sees is still one line that the stage waits and one error line."""
    root, epochs = _project(tmp_path / "project", small_data, epochs=6), 6
    process = start_training(root, _env(VAELAB_TRACKING_PATIENCE_SECONDS="25"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list((root / ".vaelab").glob("checkpoints/*/run.json")), "the run", process)
    client, [run] = _runs(root)
    locker = subprocess.Popen([sys.executable, "-c", LOCKS_THE_STORE, str(root / "mlflow.db")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        out, err = process.communicate(timeout=600)
    finally:
        locker.kill()
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    [error] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"the MLflow store sqlite:///{root / 'mlflow.db'} stayed locked for 25 s" in error and run.info.run_id in error
    assert "6 epochs of metrics, the run's data sets, the model" in error
    assert "does not answer yet; 6 epochs of metrics wait; trying again for up to 2" in err, err
    assert "database is locked" not in err  # MLflow's own report of the lock, with its SQL and traceback
    assert list((root / ".vaelab").glob("checkpoints/*/state.pt"))

    result = subprocess.run(TRAIN, cwd=root, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from its checkpoint at epoch {epochs}" in result.stdout
    _assert_delivered_once(client, run.info.run_id, epochs)


def test_evaluate_and_render_wait_for_a_server_away_and_then_name_what_waits(tmp_path, monkeypatch):
    """The later stages log through the same bounded wait: here the server never comes back within it."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("VAELAB_TRACKING_PATIENCE_SECONDS", "2")
    handoff.write_run_id(tmp_path / "run.json", "0123abcd")
    (tmp_path / "evaluation.md").write_text("# evaluation\n")
    with pytest.raises(tracking.TrackerAway) as away:
        handoff.add_to_run(tmp_path / "run.json", "the test metrics and evaluation.md", metrics={"test_neg_elbo": 1.0},
                            artifacts={tmp_path / "evaluation.md": None})
    message = str(away.value)
    assert "\n" not in message and message.startswith(f"the MLflow tracking server {url} did not answer for 2 s")
    assert "waiting to be sent: the test metrics and evaluation.md" in message and "run 0123abcd" in message
    assert "dvc repro" in message


def _stage_command(stage: str) -> list[str]:
    """The stage's command in dvc.yaml, run by this Python on this checkout's script."""
    words = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    script, *args = words[words.index("python") + 1:]
    return [sys.executable, str(REPO / script), *args]


@pytest.fixture(scope="module")
def trained_project(small_data, module_tmp_path) -> Path:
    """A project laid out as dvc.yaml has it, in which train (one epoch), evaluate and render ran into the local
    SQLite store; each test below damages one of its files in a copy."""
    root = _project(module_tmp_path / "trained", epochs=1, iwae_samples=5)
    shutil.copytree(small_data, root / "data" / "prepared")
    for stage in ("train", "evaluate", "render"):
        result = subprocess.run(_stage_command(stage), cwd=root, env=_env(), capture_output=True, text=True)
        assert result.returncode == 0, f"{stage}:\n{result.stderr[-3000:]}"
    return root


def _files(root: Path) -> dict[str, object]:
    """Every file under `root` with its bytes' digest and mtime, and every folder."""
    return {str(path.relative_to(root)): "folder" if path.is_dir() else
            (hashlib.md5(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) for path in root.rglob("*")}


def _mlflow_state(root: Path) -> list:
    """Each run in the project's store: its status, end, metrics, parameters, tags and artifacts."""
    client, runs = _runs(root)

    def artifacts(run_id: str, folder: str | None = None) -> list:
        return [entry for item in client.list_artifacts(run_id, folder)
                for entry in (artifacts(run_id, item.path) if item.is_dir else [(item.path, item.file_size)])]

    return [(run.info.run_id, run.info.status, run.info.end_time, run.data.metrics, run.data.params, run.data.tags,
             artifacts(run.info.run_id)) for run in runs]


HTML_PAGE = "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"


def _damage(root: Path, path: str, how: str) -> None:
    victim = root / path
    if how == "truncated":
        content = victim.read_bytes()
        victim.write_bytes(content[: len(content) // 2])
    elif how == "a changed byte":
        content = bytearray(victim.read_bytes())
        content[len(content) // 2] ^= 0xFF
        victim.write_bytes(bytes(content))
    elif how == "an HTML page":  # a download that went wrong
        victim.write_text(HTML_PAGE)
    elif how == "missing":
        victim.unlink()
    else:  # another file of the project, copied over it
        shutil.copyfile(root / how, victim)


def _cure(path: str, missing: bool) -> str:
    if path == "reports/history.csv":  # dvc.yaml: cache: false, so that dvc checkout cannot restore it
        return "dvc repro train makes it again"
    if missing:
        stage = "prepare" if path.startswith("data/prepared/") else "train"
        return f"dvc checkout {path} restores it, dvc repro {stage} makes it"
    return f"dvc checkout -f {path} restores it"  # -f: DVC keeps a changed file without it


DAMAGES = [  # the file, what happened to it (or which file was copied over it), the stage that reads it, the problem
    ("data/prepared/train.pt", "truncated", "train", "is a truncated PyTorch archive"),
    ("data/prepared/val.pt", "an HTML page", "train", "is not a PyTorch archive"),
    ("data/prepared/test.pt", "models/vae.pt", "evaluate", "holds no images/labels"),
    ("data/prepared/test.pt", "a changed byte", "render", "is damaged (a checksum fails)"),
    ("models/vae.pt", "truncated", "evaluate", "is a truncated PyTorch archive"),
    ("models/vae.pt", "models/snapshots.pt", "render", "is not a saved vaelab model (no config/state_dict)"),
    ("models/vae.pt", "missing", "evaluate", "not found"),
    ("models/run.json", "truncated", "evaluate", "is not valid JSON (truncated or damaged)"),
    ("models/run.json", "models/vae.pt", "render", "is not JSON (a binary file)"),
    ("models/snapshots.pt", "truncated", "render", "is a truncated PyTorch archive"),
    ("models/snapshots.pt", "data/prepared/val.pt", "render", "is not a snapshots file (no epochs, ...)"),
    ("reports/history.csv", "truncated", "render", "is truncated (its last line is cut short)"),
    ("reports/history.csv", "reports/per_digit.csv", "render", "is not a training history (no column epoch, ...)"),
]


@pytest.mark.parametrize("path, how, stage, problem", DAMAGES, ids=[f"{path}: {how}" for path, how, *_ in DAMAGES])
def test_a_damaged_input_stops_its_stage_in_one_line_naming_the_file_and_the_cure_and_nothing_is_written(
    tmp_path, trained_project, path, how, stage, problem
):
    """The stage exits 2 with one line: the file, what is wrong with it, and a cure that works for it (`dvc checkout`
    for what DVC caches, the stage that makes it otherwise); no output, MLflow run or artifact is created or changed."""
    root = tmp_path / "project"
    shutil.copytree(trained_project, root)
    _damage(root, path, how)
    mlflow_before = _mlflow_state(root)
    files_before = _files(root), _files(trained_project / "mlartifacts")  # where the run's artifacts are
    result = subprocess.run(_stage_command(stage), cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert last == f"error: {path} {problem}; {_cure(path, how == 'missing')}"
    assert (_files(root), _files(trained_project / "mlartifacts")) == files_before  # no output created or changed
    assert _mlflow_state(root) == mlflow_before  # no new run, the run's metrics and artifacts as they were


@pytest.mark.parametrize("threads, cores, busy, advice", [
    (2, 2, 1.0, 1), (2, 2, 1.9, 1), (16, 16, 1.0, 15), (4, 4, 2.6, 1),  # more threads than idle cores: a warning
    (2, 2, 0.3, None), (8, 16, 4.0, None), (1, 2, 1.9, None),  # they fit, or one thread cannot wait for another
])
def test_threads_that_do_not_fit_the_idle_cores_are_named_with_the_count_that_does(threads, cores, busy, advice):
    warning = stages.oversubscription(threads, cores, busy)
    assert warning == (None if advice is None else
                       f"warning: {busy:.1f} of {cores} CPU cores are busy elsewhere, so {threads} PyTorch threads "
                       f"stall (docs/speed.md); use OMP_NUM_THREADS={advice}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: a single thread cannot stall")
def test_training_beside_a_busy_process_warns_in_one_line_and_keeps_the_threads_it_was_given(tmp_path, small_data):
    """PyTorch's threads stall when other work holds some of their cores (docs/speed.md): the train stage says so
    with the OMP_NUM_THREADS that fits, and trains with the threads it was given (the count changes rounding)."""
    cores = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        results = {}
        for threads in (cores, 1):
            root = _project(tmp_path / f"threads{threads}", small_data, epochs=1)
            env = _env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # PyTorch reads either
            results[threads] = subprocess.run(TRAIN, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    finally:
        busy.kill()
        busy.wait()
    for threads, result in results.items():
        assert result.returncode == 0, result.stderr[-3000:]
        assert _runs(tmp_path / f"threads{threads}")[1][0].data.tags[tracking.THREADS_TAG] == str(threads)
    warnings = [line for line in results[cores].stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.fullmatch(
        rf"warning: \d+\.\d of {cores} CPU cores are busy elsewhere, so {cores} PyTorch threads stall "
        r"\(docs/speed\.md\); use OMP_NUM_THREADS=\d+", warnings[0]), results[cores].stderr[-3000:]
    assert "warning:" not in results[1].stderr  # one thread waits for no other


def test_whole_or_nothing_writes_reach_the_disk_before_they_replace_the_old_file(tmp_path, monkeypatch):
    """A rename is only as durable as the data it points to: without fsync of the file first, a power cut can leave
    the new name on an empty file, and without fsync of the folder, the old name. Both atomic writes do both."""
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), replace(a, b)))
    target = tmp_path / "models" / "vae.pt"
    target.parent.mkdir()
    target.write_text("old")
    with stages.atomic_file(target) as partial:
        partial.write_text("new")
    [(_, written), replaced, folder] = calls
    assert (Path(written).name, replaced, folder) == ("vae.pt", ("replace", str(target)), ("fsync", str(target.parent)))
    assert target.read_text() == "new"

    calls.clear()
    with stages.atomic_dir(tmp_path / "figures") as out:
        (out / "a.png").write_text("a")
        (out / "b.png").write_text("b")
    synced = [Path(path).name for kind, path in calls[:-2] if kind == "fsync"]
    assert sorted(synced[:2]) == ["a.png", "b.png"] and len(synced) == 3  # the files, then their folder
    assert calls[-2:] == [("replace", str(tmp_path / "figures")), ("fsync", str(tmp_path))]
