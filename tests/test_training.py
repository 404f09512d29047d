"""The training loop: the seed's snapshot schedule, seeded reproducibility, the history it records."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from vaelab import data
from vaelab.config import Params
from vaelab.training import Checkpointing, TrainingDiverged, snapshot_epochs, train


def test_snapshot_schedule_for_1000_epochs_is_the_seeds():
    seed_epochs = set((np.arange(0, 59) ** 1.701).astype(int)) | set(range(10))  # the seed, 0-based
    assert snapshot_epochs(1000) == sorted({e + 1 for e in seed_epochs} | {1000})
    assert len(snapshot_epochs(1000)) <= 70


def test_snapshot_schedule_is_dense_early_and_ends_at_the_last_epoch():
    for epochs in (1, 3, 10, 77, 100, 5000):
        chosen = snapshot_epochs(epochs)
        assert chosen[-1] == epochs and chosen[: min(10, epochs)] == list(range(1, min(10, epochs) + 1))
        assert len(chosen) <= 70 and chosen == sorted(set(chosen))


def _small_run(mnist, **overrides):
    params = Params(epochs=2, batch_size=100, device="cpu", **overrides)
    images = data.to_float(mnist["train"].images[:1000])
    return train(params, images[:800], images[800:], images[:300])


def test_same_seed_gives_identical_runs(mnist):
    first, second = _small_run(mnist), _small_run(mnist)
    assert first.history == second.history
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _small_run(mnist, seed=1).history != first.history


def test_history_records_losses_in_nats_and_the_seeds_scale(mnist):
    result = _small_run(mnist, optimizer="rmsprop")
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        for split in ("train", "val"):
            assert abs(row[f"{split}_reconstruction"] + row[f"{split}_kl"] - row[f"{split}_neg_elbo"]) < 1e-3
            assert abs(row[f"{split}_loss"] - row[f"{split}_neg_elbo"] / 1568) < 1e-6
            assert 50 < row[f"{split}_neg_elbo"] < 800
    assert result.history[1]["train_neg_elbo"] < result.history[0]["train_neg_elbo"]
    assert result.snapshots.epochs == [1, 2]
    assert result.snapshots.manifolds[0].shape == (420, 420) and result.snapshots.manifolds[0].dtype == torch.uint8
    assert result.snapshots.latent_means[0].shape == (300, 2)


def test_a_run_resumed_from_its_checkpoint_ends_bit_for_bit_as_an_uninterrupted_one(mnist, tmp_path):
    images = data.to_float(mnist["train"].images[:1000])
    params = Params(epochs=4, batch_size=100, device="cpu")
    whole = train(params, images[:800], images[800:], images[:300])

    class Interrupted(Exception):
        pass

    def stop_at_epoch_3(row):
        if row["epoch"] == 3:
            raise Interrupted

    checkpointing = Checkpointing(tmp_path / "state.pt", every_seconds=0)
    with pytest.raises(Interrupted):
        train(params, images[:800], images[800:], images[:300], on_epoch=stop_at_epoch_3, checkpointing=checkpointing)
    resumed = train(params, images[:800], images[800:], images[:300], checkpointing=checkpointing)

    assert resumed.history == whole.history
    assert resumed.snapshots.epochs == whole.snapshots.epochs == [1, 2, 3, 4]
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_diverging_run_stops_naming_epoch_and_step(mnist):
    images = data.to_float(mnist["train"].images[:1000])
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d+ of 8"):
        train(Params(epochs=3, batch_size=100, lr=10.0, device="cpu"), images[:800], images[800:], images[:300])


def test_training_and_the_benchmarks_timing_run_on_a_box_with_pytorch_alone(mnist_dir):
    """A GPU machine may have PyTorch and nothing else: no MLflow, DVC, YAML, matplotlib or NumPy."""
    script = f"""
import sys
for name in ("mlflow", "dvc", "yaml", "matplotlib", "numpy", "pandas", "tqdm", "PIL"):
    sys.modules[name] = None  # importing any of these now fails
from pathlib import Path
from vaelab import bench, data, training
from vaelab.config import Params
images = data.to_float(data.read_mnist({{n: Path({str(mnist_dir)!r}) / n for n in data.FILES}})["train"].images[:600])
params = Params(epochs=2, batch_size=100, device="cpu")
result = training.train(params, images[:500], images[500:], images[:50])
seconds, logging_share, wall, _ = bench.project_epoch_seconds(params, images[:500], images[500:], images[:50], Path("x"))
print(len(result.history), len(seconds), logging_share)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2", "None"]  # two epochs trained and timed, no logging share
