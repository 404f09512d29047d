"""The training loop: the seed's snapshot schedule, seeded reproducibility, the history it records."""
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vaelab import data
from vaelab.config import Params
from vaelab.resume import Checkpointing
from vaelab.training import TrainingDiverged, kl_weight, learning_rate, snapshot_epochs, train


def test_snapshot_schedule_for_1000_epochs_is_the_seeds():
    seed_epochs = set((np.arange(0, 59) ** 1.701).astype(int)) | set(range(10))  # the seed, 0-based
    assert snapshot_epochs(1000) == sorted({e + 1 for e in seed_epochs} | {1000})
    assert len(snapshot_epochs(1000)) <= 70


def test_snapshot_schedule_is_dense_early_and_ends_at_the_last_epoch():
    for epochs in (1, 3, 10, 77, 100, 5000):
        chosen = snapshot_epochs(epochs)
        assert chosen[-1] == epochs and chosen[: min(10, epochs)] == list(range(1, min(10, epochs) + 1))
        assert len(chosen) <= 70 and chosen == sorted(set(chosen))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
CUDA = DEVICES[1:]


def _small_run(mnist, step_mode=None, **overrides):
    params = Params(**{"epochs": 2, "batch_size": 100, "device": "cpu", **overrides})
    images, labels = data.to_float(mnist["train"].images[:1000]), mnist["train"].labels[:1000]
    return train(params, images[:790], images[790:], images[:300], step_mode=step_mode,  # batches of 100 and 90
                 labels=(labels[:790], labels[790:], labels[:300]))


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_gives_identical_runs(mnist, device):
    first, second = _small_run(mnist, device=device), _small_run(mnist, device=device)
    assert first.history == second.history
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _small_run(mnist, device=device, seed=1).history != first.history


@pytest.mark.parametrize("device", DEVICES)
def test_a_conditional_run_is_seeded_and_snapshots_the_manifold_under_each_digit(mnist, device):
    first = _small_run(mnist, device=device, conditional=True)
    second = _small_run(mnist, device=device, conditional=True)
    assert first.history == second.history and first.model.config.conditional
    assert first.history != _small_run(mnist, device=device).history  # the label changes what is learnt
    assert [m.shape for m in first.snapshots.manifolds] == [(10, 5 * 28, 5 * 28)] * 3  # epochs 0, 1 and 2
    assert first.snapshots.latent_means[-1].shape == (300, 2)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("binarize, overrides", [
    ("none", {}), ("dynamic", {}), ("dynamic", {"conditional": True}),
    # through autograd (AutogradStep): Burda et al.'s network with IWAE, and the seed's with k samples and warm-up
    ("dynamic", {"architecture": "burda", "dropout": 0.0, "objective": "iwae", "train_samples": 5}),
    ("none", {"objective": "iwae", "train_samples": 3, "kl_warmup_epochs": 3}),
])
def test_cuda_graph_replays_train_as_the_eager_step_does(mnist, device, binarize, overrides):
    """Replayed graphs of both batch sizes (after two eager warm-up steps each) against the eager step."""
    graphs = _small_run(mnist, device=device, binarize=binarize, epochs=4, **overrides)
    eager = _small_run(mnist, "eager", device=device, binarize=binarize, epochs=4, **overrides)
    for row_graphs, row_eager in zip(graphs.history, eager.history):
        assert row_graphs == pytest.approx(row_eager, rel=1e-4)
    for (name, a), b in zip(graphs.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_burda_schedule_is_their_rates_over_3280_epochs_and_scales_to_other_lengths():
    params = Params(lr=1e-3, lr_schedule="burda", epochs=3280)
    stage_of_epoch = [i for i in range(8) for _ in range(3**i)]  # 3^i epochs at lr * 10^(-i/7)
    assert len(stage_of_epoch) == 3280
    assert [learning_rate(params, e + 1) for e in range(3280)] == [1e-3 * 10 ** (-i / 7) for i in stage_of_epoch]
    short = Params(lr=1e-3, lr_schedule="burda", epochs=328)  # a tenth: each stage a tenth as long
    rates = [learning_rate(short, e) for e in range(1, 329)]
    assert rates[0] == 1e-3 and rates[-1] == pytest.approx(1e-4) and rates == sorted(rates, reverse=True)
    assert sum(rate == pytest.approx(1e-4) for rate in rates) == pytest.approx(218.7, abs=1)  # 2187 / 10


def test_cosine_and_constant_schedules():
    cosine = Params(lr=2e-3, lr_schedule="cosine", epochs=100)
    assert learning_rate(cosine, 1) == 2e-3 and learning_rate(cosine, 51) == pytest.approx(1e-3)
    assert learning_rate(cosine, 100) == pytest.approx(2e-3 * (1 + math.cos(math.pi * 99 / 100)) / 2)
    assert {learning_rate(Params(lr=3e-4), e) for e in (1, 50, 200)} == {3e-4}


def test_kl_warm_up_starts_at_0_and_rises_linearly_to_beta():
    params = Params(beta=2.0, kl_warmup_epochs=4)
    assert [kl_weight(params, e) for e in range(1, 8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight(Params(), 1) == 1.0


def test_the_history_records_the_rate_the_kl_weight_and_the_objective_beside_the_true_elbo(mnist):
    result = _small_run(mnist, epochs=3, kl_warmup_epochs=2, lr_schedule="cosine", lr=1e-3)
    assert [row["kl_weight"] for row in result.history] == [0.0, 0.5, 1.0]
    assert [row["lr"] for row in result.history] == [learning_rate(Params(lr=1e-3, lr_schedule="cosine", epochs=3), e)
                                                     for e in (1, 2, 3)]
    for row in result.history:
        assert row["train_objective"] == pytest.approx(row["train_reconstruction"] + row["kl_weight"] * row["train_kl"])
        assert row["train_neg_elbo"] == pytest.approx(row["train_reconstruction"] + row["train_kl"], abs=1e-3)


def test_a_higher_beta_gives_a_lower_kl(mnist):
    kl = {beta: _small_run(mnist, beta=beta, dropout=0.0, lr=1e-3).history[-1]["val_kl"] for beta in (0.5, 1.0, 4.0)}
    assert kl[4.0] < kl[1.0] < kl[0.5]


def test_history_records_losses_in_nats_and_the_seeds_scale(mnist):
    result = _small_run(mnist, optimizer="rmsprop")
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        for split in ("train", "val"):
            assert abs(row[f"{split}_reconstruction"] + row[f"{split}_kl"] - row[f"{split}_neg_elbo"]) < 1e-3
            assert abs(row[f"{split}_loss"] - row[f"{split}_neg_elbo"] / 1568) < 1e-6
            assert 50 < row[f"{split}_neg_elbo"] < 800
    assert result.history[1]["train_neg_elbo"] < result.history[0]["train_neg_elbo"]
    assert result.snapshots.epochs == [0, 1, 2]  # 0: the untrained model
    assert result.snapshots.manifolds[0].shape == (420, 420) and result.snapshots.manifolds[0].dtype == torch.uint8
    assert result.snapshots.latent_means[0].shape == (300, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_resumed_from_its_checkpoint_ends_bit_for_bit_as_an_uninterrupted_one(mnist, tmp_path, device):
    images = data.to_float(mnist["train"].images[:1000])
    params = Params(epochs=4, batch_size=100, device=device)
    whole = train(params, images[:800], images[800:], images[:300])

    class Interrupted(Exception):
        pass

    def stop_at_epoch_3(row):
        if row["epoch"] == 3:
            raise Interrupted

    checkpointing = Checkpointing(tmp_path / "state.pt", every_seconds=0)
    with pytest.raises(Interrupted):
        train(params, images[:800], images[800:], images[:300], on_epoch=stop_at_epoch_3, checkpointing=checkpointing)
    rows = []
    resumed = train(params, images[:800], images[800:], images[:300], on_epoch=rows.append,
                    checkpointing=checkpointing)

    assert resumed.history == whole.history
    assert resumed.resumed_at == 2 and rows == whole.history  # the restored rows too, for the tracker
    assert resumed.snapshots.epochs == whole.snapshots.epochs == [0, 1, 2, 3, 4]
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)


DAMAGES = {  # how a checkpoint was damaged, and the line that says so
    "truncated": (lambda b: b[: len(b) // 2], "is a truncated PyTorch archive"),
    "a changed byte": (lambda b: b[:1000] + bytes([b[1000] ^ 0xFF]) + b[1001:], "is damaged (a checksum fails)"),
    "another archive": (None, "is not a vaelab checkpoint of this version"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_in_one_line_and_training_starts_afresh(mnist, tmp_path, capsys, damage):
    """A checkpoint is a cache: a torn or foreign one (a power cut, a full disk) costs the epochs it held, never
    the run; the run then ends as an uninterrupted one does."""
    images = data.to_float(mnist["train"].images[:1000])
    params = Params(epochs=3, batch_size=100, device="cpu")
    whole = train(params, images[:800], images[800:], images[:300])
    state = tmp_path / "state.pt"
    train(Params(epochs=2, batch_size=100, device="cpu"), images[:800], images[800:], images[:300],
          checkpointing=Checkpointing(state, every_seconds=0))
    change, problem = DAMAGES[damage]
    if change is None:
        torch.save({"epoch": 2, "weights": torch.zeros(3)}, state)
    else:
        state.write_bytes(change(state.read_bytes()))
    capsys.readouterr()

    resumed = train(params, images[:800], images[800:], images[:300], checkpointing=Checkpointing(state))

    assert capsys.readouterr().err == f"warning: the checkpoint {state} {problem}; training starts afresh\n"
    assert resumed.resumed_at == 0 and resumed.history == whole.history


def test_a_diverging_run_stops_naming_epoch_and_step(mnist):
    images = data.to_float(mnist["train"].images[:1000])
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d+ of 8"):
        train(Params(epochs=3, batch_size=100, lr=10.0, device="cpu"), images[:800], images[800:], images[:300])


def test_training_and_the_benchmarks_timing_run_on_a_box_with_pytorch_alone(mnist, tmp_path):
    """A GPU machine may have PyTorch and nothing else: no MLflow, DVC, YAML, matplotlib or NumPy."""
    data.save_split(data.Split(mnist["train"].images[:600], mnist["train"].labels[:600]), tmp_path / "train.pt")
    script = f"""
import sys
for name in ("mlflow", "dvc", "yaml", "matplotlib", "numpy", "pandas", "tqdm", "PIL", "torchvision"):
    sys.modules[name] = None  # importing any of these now fails
from pathlib import Path
from vaelab import bench, data, training
from vaelab.config import Params
images = data.to_float(data.load_split(Path({str(tmp_path)!r}), "train").images)
params = Params(epochs=2, batch_size=100, device="cpu")
result = training.train(params, images[:500], images[500:], images[:50])
seconds, logging_share, wall, _, _ = bench.project_epoch_seconds(params, images[:500], images[500:], images[:50], Path("x"))
print(len(result.history), len(seconds), logging_share)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2", "None"]  # two epochs trained and timed, no logging share


def test_checkpoints_are_written_every_so_many_seconds_and_at_the_last_epoch(mnist, tmp_path, monkeypatch):
    """A clock that ticks one second per reading: with every_seconds=3 the checkpoints fall on epochs 3, 6 and
    the last, not on every epoch once the first interval has passed."""
    ticks = iter(range(1, 1000))
    monkeypatch.setattr("vaelab.training.time", SimpleNamespace(monotonic=lambda: next(ticks)))
    saved = []
    monkeypatch.setattr("vaelab.resume.save", lambda path, epoch, *state: saved.append(epoch))
    checkpointing = Checkpointing(tmp_path / "state.pt", every_seconds=3)
    images = data.to_float(mnist["train"].images[:300])
    train(Params(epochs=8, batch_size=100, device="cpu"), images[:200], images[200:], images[:10],
          checkpointing=checkpointing)
    assert saved == [3, 6, 8]
