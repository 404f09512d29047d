"""The trained decoder as an MLflow pyfunc model: latent vectors (and, for a conditional VAE, labels) in, images out."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

import vaelab
from vaelab.model import DIGITS, LabelMismatch, ModelConfig
from vaelab.saved_model import load_vae
from vaelab.store import store_lock


class DecoderModel(mlflow.pyfunc.PythonModel):
    """Latent vectors (n, latent_dim) in, decoded images (n, 28, 28) in [0, 1] out. A conditional VAE's takes
    {"z": latent vectors (n, latent_dim), "label": digits (n,)} and draws each z as the digit beside it."""

    def load_context(self, context) -> None:
        self.vae = load_vae(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """`model_input` is a dict of arrays for a conditional VAE (the signature's named tensors; MLflow refuses
        input of the other kind before this runs). The hint np.ndarray, one MLflow infers no schema from, keeps
        the logged signature and MLflow from warning about a predict without type hints."""
        if not self.vae.config.conditional:
            return self.vae.decode(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()
        z = torch.as_tensor(np.asarray(model_input["z"], dtype=np.float32))
        labels = torch.as_tensor(np.asarray(model_input["label"], dtype=np.int64))
        if labels.shape != (len(z),) or labels.min() < 0 or labels.max() >= DIGITS:
            raise LabelMismatch(f"'label' must hold one digit from 0 to 9 per latent vector ({len(z)})")
        return self.vae.decode(z, labels).numpy()


def log_model_once(client: MlflowClient, run_id: str, weights: Path, config: ModelConfig) -> None:
    """Log the trained decoder as an MLflow pyfunc model that loads the weights-only checkpoint, unless an
    earlier try (one that lost its answer, or a stage run again) already did."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    z = TensorSpec(np.dtype(np.float32), (-1, config.latent_dim), "z" if config.conditional else None)
    labels = [TensorSpec(np.dtype(np.int64), (-1,), "label")] if config.conditional else []
    signature = ModelSignature(
        inputs=Schema([z, *labels]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
    )
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    if any(model.status == LoggedModelStatus.READY for model in logged):
        return
    with store_lock(), mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DecoderModel(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(vaelab.__file__).parent)],
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
