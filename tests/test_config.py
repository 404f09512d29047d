"""The one schema for params.yaml: defaults, and a clear message for every bad value."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaelab.config import Params, ParamsError, load, validate

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_the_seeds_settings():
    params = load(REPO / "params.yaml")
    assert (params.latent_dim, params.dropout, params.optimizer, params.lr, params.batch_size) == (
        2, 0.3, "adam", 1e-4, 500)
    assert params.device == "auto"
    assert (params.lr_schedule, params.beta, params.kl_warmup_epochs) == ("constant", 1.0, 0)
    assert (params.architecture, params.objective, params.train_samples, params.output_bias) == (
        "seed", "elbo", 1, "zero")


def test_missing_keys_take_defaults_and_ints_are_accepted_as_floats():
    assert validate({}) == Params()
    assert validate({"dropout": 0, "lr": 1}).dropout == 0.0


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"latent_size": 2}, ["unknown key 'latent_size'", "latent_dim"]),
        ({"latent_dim": "two"}, ["latent_dim", "'two'", "an integer from 1"]),
        ({"latent_dim": 2.5}, ["latent_dim", "2.5"]),
        ({"latent_dim": True}, ["latent_dim", "True"]),
        ({"latent_dim": 0}, ["latent_dim", "0", "out of range", "from 1 to 1024"]),
        ({"dropout": 1}, ["dropout", "1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout", "-0.1"]),
        ({"optimizer": "sgd"}, ["optimizer", "'sgd'", "adam, rmsprop"]),
        ({"lr": -0.001}, ["lr", "-0.001"]),
        ({"lr": float("nan")}, ["lr", "nan"]),
        ({"batch_size": 0}, ["batch_size", "0"]),
        ({"batch_size": 1}, ["batch_size", "1", "out of range", "from 2"]),
        ({"batch_size": 60000}, ["batch_size", "60000", "larger than the training set", "55000"]),
        ({"epochs": 0}, ["epochs", "0", "from 1"]),
        ({"device": "tpu"}, ["device", "'tpu'", "auto, cpu, cuda"]),
        ({"val_size": 0}, ["val_size", "0"]),
        ({"lr_schedule": "step"}, ["lr_schedule", "'step'", "constant, burda, cosine"]),
        ({"beta": -1}, ["beta", "-1.0", "[0, 1000]"]),
        ({"beta": "high"}, ["beta", "'high'"]),
        ({"kl_warmup_epochs": -5}, ["kl_warmup_epochs", "-5", "from 0"]),
        ({"kl_warmup_epochs": 2.5}, ["kl_warmup_epochs", "2.5"]),
        ({"architecture": "resnet"}, ["architecture", "'resnet'", "seed, burda"]),
        ({"objective": "vae"}, ["objective", "'vae'", "elbo, iwae"]),
        ({"train_samples": 0}, ["train_samples", "0", "from 1 to 5000"]),
        ({"train_samples": 5.0}, ["train_samples", "5.0", "an integer"]),
        ({"output_bias": "mean"}, ["output_bias", "'mean'", "zero, data_mean"]),
        ({"architecture": "burda"}, ["dropout: 0.3 does not apply to architecture: burda", "set dropout: 0"]),
        ([1, 2], ["mapping"]),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(raw, words):
    with pytest.raises(ParamsError) as error:
        validate(raw)
    for word in words:
        assert word in str(error.value)


def test_a_stage_with_bad_params_exits_non_zero_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**Params().to_dict(), "dropout": 1}))
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "train.py"), "data", "models", "reports/history.csv"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "dropout: 1.0 is out of range; expected a number in [0, 1)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no outputs, no mlflow.db


def test_params_are_read_as_dvc_reads_them_yaml_1_2(tmp_path):
    """DVC reads params.yaml as YAML 1.2 (ruamel.yaml); PyYAML's 1.1 read `3e-4` as a string and `yes` as true."""
    from dvc.utils.serialize import parse_yaml

    text = "lr: 3e-4\nbeta: 1E1\ndropout: .25\nconditional: false\n"
    (tmp_path / "params.yaml").write_text(text)
    params = load(tmp_path / "params.yaml")
    assert (params.lr, params.beta, params.dropout) == (0.0003, 10.0, 0.25)
    assert {key: getattr(params, key) for key in ("lr", "beta", "dropout", "conditional")} == parse_yaml(text, "p")


@pytest.mark.parametrize("word", ["yes", "on", "no", "off"])
def test_yaml_1_1_booleans_are_refused_as_dvc_records_them_as_strings(tmp_path, word):
    (tmp_path / "params.yaml").write_text(f"conditional: {word}\n")
    with pytest.raises(ParamsError, match=f"conditional: '{word}' is not allowed; expected true or false"):
        load(tmp_path / "params.yaml")


def test_evaluation_only_settings_are_not_part_of_a_trainings_identity():
    assert "iwae_samples" not in Params().training_dict()
    assert Params(iwae_samples=5000).digest() == Params().digest() != Params(latent_dim=3).digest()
