"""Everything MLflow: the store, the one run per trained parameter set, metrics, figures and the model.

`train` starts the run and hands its id to the later stages through a small JSON file; `evaluate` and
`render` log into that same run. Nothing here is imported by the model or the training maths.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import vaelab
from vaelab.config import Params
from vaelab.model import load_vae

EXPERIMENT_NAME = "vaelab"
STORE_FILE = "mlflow.db"  # MLflow's own default name for a SQLite store
ARTIFACT_DIR = "mlartifacts"  # beside the SQLite store, as `mlflow server` names it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens other experiments in its GenAI view


def project_root() -> Path:
    """The repository root; under `dvc exp run --queue` DVC_ROOT points at the user's repository, not the
    temporary copy the experiment runs in, so every run lands in the same store."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go in a folder beside the database (not the current directory,
    which for a queued experiment is a temporary copy that DVC deletes)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACT_DIR).as_uri()


def _client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment; two workers creating it at once both end with the same one."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=_artifact_location(tracking_uri()),
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


def run_tags() -> dict[str, str]:
    """The git commit and, under `dvc exp run`, the DVC experiment's name and baseline revision."""
    tags = {}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = name
        tags["mlflow.runName"] = name
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = baseline
    return tags


class TrainingRun:
    """The MLflow run of one training; per-epoch metrics are sent in batches, not one round trip each."""

    FLUSH_SECONDS = 10.0

    def __init__(self, params: Params):
        self.client = _client()
        experiment_id = _experiment_id(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME))
        tags = run_tags()
        run = self.client.create_run(experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.to_dict().items()])
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_epoch(self, row: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        step = int(row["epoch"])
        self._pending += [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
        self._last_flush = time.monotonic()

    def end(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


@contextmanager
def training_run(params: Params) -> Iterator[TrainingRun]:
    """A run that ends FINISHED, or KILLED on Ctrl-C, or FAILED on any other error."""
    run = TrainingRun(params)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


@contextmanager
def resumed_run(run_id_file: Path) -> Iterator[str]:
    """Reopen the training run recorded by `train`, for the later stages to log into."""
    run_id = json.loads(Path(run_id_file).read_text())["run_id"]
    client = _client()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RuntimeError(
            f"MLflow run {run_id} (from {run_id_file}) is not in the store {tracking_uri()}; "
            "re-train to create it there: dvc repro --force train"
        ) from None
    with mlflow.start_run(run_id=run_id):
        yield run_id


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def log_artifacts(folder: Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(folder), artifact_path)


class DecoderModel(mlflow.pyfunc.PythonModel):
    """Latent vectors (n, latent_dim) in, decoded images (n, 28, 28) in [0, 1] out."""

    def load_context(self, context) -> None:
        self.vae = load_vae(context.artifacts["weights"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
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
    with mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DecoderModel(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(vaelab.__file__).parent)],
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
