"""The one schema for `params.yaml`: every stage validates the whole file before doing any work."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MNIST_TRAIN_SIZE = 60_000


class ParamsError(ValueError):
    """A bad value in params.yaml; the message names the key, the value and what is allowed."""


LR_SCHEDULES = ("constant", "burda", "cosine")  # see training.learning_rate
# the model's choices (vaelab.model, which imports torch; named here so that the schema needs no torch)
ARCHITECTURES = ("seed", "burda")
OBJECTIVES = ("elbo", "iwae")
OUTPUT_BIASES = ("zero", "data_mean")
EVALUATION_ONLY = ("iwae_samples",)  # read by `evaluate` alone; it records them as metrics


@dataclass(frozen=True)
class Params:
    """The experiment's settings; defaults are the seed's, except `epochs` (see README)."""

    latent_dim: int = 2
    dropout: float = 0.3
    optimizer: str = "adam"
    lr: float = 1e-4
    lr_schedule: str = "constant"
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    batch_size: int = 500
    epochs: int = 200
    seed: int = 0
    device: str = "auto"
    val_size: int = 5000
    binarize: str = "none"
    iwae_samples: int = 500
    conditional: bool = False
    architecture: str = "seed"
    objective: str = "elbo"
    train_samples: int = 1
    output_bias: str = "zero"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict[str, Any]:
        """The settings that shape the trained model: logged as the MLflow run's parameters, which cannot
        change afterwards, while a change to an evaluation-only setting re-runs only `evaluate`."""
        return {k: v for k, v in self.to_dict().items() if k not in EVALUATION_ONLY}

    def digest(self) -> str:
        """A short name for this training (checkpoints and orphaned runs are found by it)."""
        return hashlib.sha256(json.dumps(self.training_dict(), sort_keys=True).encode()).hexdigest()[:16]


# key -> (type, check, what is allowed). bool is rejected for numbers (yaml `yes` is not a latent size), and only a
# bool is a bool (not 1, nor the string "true").
_RULES: dict[str, tuple[type, Any, str]] = {
    "latent_dim": (int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
    "dropout": (float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "optimizer": (str, lambda v: v in ("adam", "rmsprop"), "one of: adam, rmsprop"),
    "lr": (float, lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
    "lr_schedule": (str, lambda v: v in LR_SCHEDULES, f"one of: {', '.join(LR_SCHEDULES)}"),
    "beta": (float, lambda v: 0.0 <= v <= 1000.0, "a number in [0, 1000]"),
    "kl_warmup_epochs": (int, lambda v: 0 <= v <= 100_000, "an integer from 0 to 100000"),
    "batch_size": (int, lambda v: v >= 2, "an integer from 2 (BatchNorm needs two images) to the training set size"),
    "epochs": (int, lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "seed": (int, lambda v: 0 <= v < 2**63, "a non-negative integer"),
    "device": (str, lambda v: v in ("auto", "cpu", "cuda"), "one of: auto, cpu, cuda"),
    "binarize": (str, lambda v: v in ("none", "dynamic", "static"), "one of: none, dynamic, static"),
    "iwae_samples": (int, lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "conditional": (bool, lambda v: True, "true or false"),
    "architecture": (str, lambda v: v in ARCHITECTURES, f"one of: {', '.join(ARCHITECTURES)}"),
    "objective": (str, lambda v: v in OBJECTIVES, f"one of: {', '.join(OBJECTIVES)}"),
    "train_samples": (int, lambda v: 1 <= v <= 5000, "an integer from 1 to 5000"),
    "output_bias": (str, lambda v: v in OUTPUT_BIASES, f"one of: {', '.join(OUTPUT_BIASES)}"),
    "val_size": (int, lambda v: 1 <= v <= MNIST_TRAIN_SIZE // 2, f"an integer from 1 to {MNIST_TRAIN_SIZE // 2}"),
}


def _check(key: str, value: Any) -> Any:
    kind, ok, allowed = _RULES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) != (kind is bool) or not isinstance(value, kind)
            or (kind is float and not math.isfinite(value))):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected {allowed}")
    if not ok(value):
        raise ParamsError(f"params.yaml: {key}: {value!r} is out of range; expected {allowed}")
    return value


def validate(raw: Any) -> Params:
    """Check every key and value; raise ParamsError on the first problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml must be a mapping of keys to values, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_RULES))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {unknown[0]!r}; allowed keys: {', '.join(_RULES)}")
    values = {key: _check(key, value) for key, value in raw.items()}
    params = Params(**values)
    train_size = MNIST_TRAIN_SIZE - params.val_size
    if params.batch_size > train_size:
        raise ParamsError(
            f"params.yaml: batch_size: {params.batch_size} is larger than the training set "
            f"({train_size} images = {MNIST_TRAIN_SIZE} - val_size {params.val_size})"
        )
    if params.architecture == "burda" and params.dropout:
        raise ParamsError(
            f"params.yaml: dropout: {params.dropout} does not apply to architecture: burda (Burda et al.'s network "
            "has no dropout); set dropout: 0, or architecture: seed"
        )
    return params


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; a missing key takes its default. It is read as DVC reads it (ruamel.yaml's
    safe loader, YAML 1.2), so that the value validated is the one `dvc exp show` records: `lr: 3e-4` is a number,
    and `conditional: yes` the string 'yes', not YAML 1.1's true."""
    from ruamel.yaml import YAML, YAMLError  # here: the training core imports with PyTorch alone (a bare GPU box)

    path = Path(path)
    try:
        raw = YAML(typ="safe").load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run the stages from the repository root") from None
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return validate(raw if raw is not None else {})
