"""Everything MLflow: the store, the one run per trained parameter set, metrics, figures and the model.

`train` starts the run and hands its id to the later stages through a small JSON file; `evaluate` and
`render` log into that same run. Nothing here is imported by the model or the training maths.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import vaelab
from vaelab.config import Params
from vaelab.data import md5
from vaelab.model import load_vae
from vaelab.stages import StageError, project_root

EXPERIMENT_NAME = "vaelab"
STORE_FILE = "mlflow.db"  # MLflow's own default name for a SQLite store
ARTIFACT_DIR = "mlartifacts"  # beside the SQLite store, as `mlflow server` names it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what kind of experiment this is; MLflow 3.17's UI ignores it
PARAMS_TAG, HOST_TAG, PID_TAG = "vaelab.params_digest", "vaelab.host", "vaelab.pid"
THREADS_TAG = "vaelab.torch_threads"  # CPU threads of the run (OMP_NUM_THREADS): speed and float rounding
REACHABLE_TIMEOUT_S = 5
# Fail in seconds, not after minutes of MLflow's default retries, when a tracking server goes away.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def redacted(uri: str) -> str:
    """The URI without a password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port or ''}".rstrip(":")))


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock() -> Iterator[None]:
    """Serialise writes to a SQLite store across processes (parallel DVC queue workers): SQLite allows
    one writer at a time and MLflow would otherwise fail with "database is locked" or race to create
    the tables. Other stores handle concurrency themselves."""
    database = _sqlite_path(tracking_uri())
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_reachable() -> None:
    """Fail within seconds, before any training, when an HTTP tracking server does not answer."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACHABLE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        raise StageError(f"the MLflow tracking server {redacted(uri)} does not answer ({error}); "
                         "start it or point MLFLOW_TRACKING_URI elsewhere") from None


def _client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock():  # opening a new SQLite store creates its tables: one process at a time
        return MlflowClient(uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment; two workers creating it at once both end with the same one."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        database = _sqlite_path(tracking_uri())
        try:
            return client.create_experiment(
                name,
                # beside the database, not in the working directory, which for a queued experiment is a
                # temporary copy that DVC deletes
                artifact_location=(database.parent / ARTIFACT_DIR).as_uri() if database else None,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def ui_link(base_url: str = "http://127.0.0.1:5000", uri: str = f"sqlite:///{STORE_FILE}") -> str:
    """The page to open in `mlflow ui`: the experiment's runs table in MLflow 3's "Model training" view
    (3.17 opens an experiment in its GenAI view otherwise, whatever its tags), or the home page before the
    first run. Reading a store that does not exist would create it, so that is checked first."""
    database = _sqlite_path(uri)
    if database is None or database.exists():
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
        experiment = MlflowClient(uri).get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "active":
            return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    return base_url


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_tags(params: Params) -> dict[str, str]:
    """The git commit, who runs it with how many CPU threads, and a name that says what was trained: under
    `dvc exp run` the DVC experiment's name (with its baseline), under `dvc repro` the branch and short
    commit, e.g. `main@1a2b3c4`."""
    tags = {PARAMS_TAG: params.digest(), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            THREADS_TAG: str(torch.get_num_threads())}
    if commit := _git("rev-parse", "HEAD"):
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags["mlflow.runName"] = f"{branch}@{commit[:7]}" if branch and branch != "HEAD" else commit[:7]
    if name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = name
        tags["mlflow.runName"] = name
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = baseline
    return tags


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close_orphans(client: MlflowClient, experiment_id: str, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs, whatever their parameters, whose process on this host is gone (kill -9, a
    crash, a power cut). Their checkpoints stay: training those parameters again resumes the same run."""
    orphans = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{HOST_TAG}` = '{socket.gethostname()}' and attributes.status = 'RUNNING'",
    )
    for run in orphans:
        tags = run.data.tags
        if run.info.run_id != keep and not _alive(int(tags.get(PID_TAG, "0"))):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


class TrainingRun:
    """The MLflow run of one training; per-epoch metrics are sent in batches, not one round trip each.

    `resume_id` continues a run that an interrupted training of the same parameters left behind."""

    FLUSH_SECONDS = 10.0

    def __init__(self, params: Params, resume_id: str | None = None):
        self.client = _client()
        tags = run_tags(params)
        with store_lock():
            experiment_id = _experiment_id(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME))
            self.run_id = resume_id if resume_id and self._exists(resume_id) else None
            _close_orphans(self.client, experiment_id, keep=self.run_id)
            if self.run_id:
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            else:
                run = self.client.create_run(experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
                self.run_id = run.info.run_id
                params_logged = [Param(k, str(v)) for k, v in params.training_dict().items()]
                self.client.log_batch(self.run_id, params=params_logged)
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_training_data(self, data_dir: Path, contexts: dict[str, str]) -> None:
        """The prepared splits the run trains on, as MLflow dataset inputs (the runs table's Dataset column):
        each named `mnist-<split>`, its digest the md5 that DVC records for the file, its source the file's
        path in the project; `contexts` maps each split to its role (training, validation)."""
        inputs = []
        for split, context in contexts.items():
            path = Path(data_dir) / f"{split}.pt"
            source = get_dataset_source_from_json(json.dumps({"uri": path.as_posix()}), source_type="local")
            dataset = MetaDataset(source, name=f"mnist-{split}", digest=md5(path))._to_mlflow_entity()
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        with store_lock():
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_epoch(self, row: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        step = int(row["epoch"])
        self._pending += [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        with store_lock():
            for start in range(0, len(self._pending), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
        self._last_flush = time.monotonic()

    def end(self, status: str) -> None:
        self.flush()
        with store_lock():
            self.client.set_terminated(self.run_id, status)


@contextmanager
def training_run(params: Params, resume_id: str | None = None) -> Iterator[TrainingRun]:
    """A run that ends FINISHED, or KILLED on Ctrl-C or SIGTERM, or FAILED on any other error."""
    run = TrainingRun(params, resume_id)
    try:
        yield run
    except KeyboardInterrupt:
        run.end(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        run.end(RunStatus.to_string(RunStatus.FAILED))
        raise
    run.end(RunStatus.to_string(RunStatus.FINISHED))


def write_run_id(path: Path, run_id: str) -> None:
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


def read_run_id(path: Path) -> str | None:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def resumed_run(run_id_file: Path) -> Iterator[str]:
    """Reopen the training run recorded by `train`, for the later stages to log into."""
    run_id = read_run_id(run_id_file)
    client = _client()
    try:
        client.get_run(run_id or "")
    except MlflowException:
        raise StageError(
            f"MLflow run {run_id} (from {run_id_file}) is not in the store {redacted(tracking_uri())}; "
            "re-train to create it there: dvc repro --force train"
        ) from None
    with store_lock(), mlflow.start_run(run_id=run_id):
        yield run_id


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path))


def log_artifacts(folder: Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(folder), artifact_path)


class DecoderModel(mlflow.pyfunc.PythonModel):
    """Latent vectors (n, latent_dim) in, decoded images (n, 28, 28) in [0, 1] out."""

    def load_context(self, context) -> None:
        self.vae = load_vae(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.vae.decode(z).numpy()


def log_model(run_id: str, weights: Path, latent_dim: int) -> None:
    """Log the trained decoder as an MLflow pyfunc model that loads the weights-only checkpoint."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, latent_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
    )
    with store_lock(), mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DecoderModel(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(vaelab.__file__).parent)],
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
