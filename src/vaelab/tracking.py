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
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import vaelab
from vaelab.config import Params
from vaelab.model import load_vae
from vaelab.stages import StageError, project_root

EXPERIMENT_NAME = "vaelab"
STORE_FILE = "mlflow.db"  # MLflow's own default name for a SQLite store
ARTIFACT_DIR = "mlartifacts"  # beside the SQLite store, as `mlflow server` names it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens other experiments in its GenAI view
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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_tags(params: Params) -> dict[str, str]:
    """The git commit, who runs it with how many CPU threads, and under `dvc exp run` the DVC experiment's
    name and baseline."""
    tags = {PARAMS_TAG: params.digest(), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            THREADS_TAG: str(torch.get_num_threads())}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
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


def _close_orphans(client: MlflowClient, experiment_id: str, params: Params, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs of these parameters whose process on this host is gone (kill -9)."""
    orphans = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARAMS_TAG}` = '{params.digest()}' and attributes.status = 'RUNNING'",
    )
    for run in orphans:
        tags = run.data.tags
        if run.info.run_id != keep and tags.get(HOST_TAG) == socket.gethostname() and not _alive(
            int(tags.get(PID_TAG, "0"))
        ):
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
            _close_orphans(self.client, experiment_id, params, keep=self.run_id)
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
