"""The literature's rows train and evaluate as the stages do, and their record is what docs/literature.md shows."""
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from vaelab import data, literature, training

REPO = Path(__file__).resolve().parents[1]


def test_each_row_is_burda_et_als_setting_with_its_own_network_objective_and_bias():
    for row in literature.ROWS:
        params = row.params("cpu")
        assert (params.latent_dim, params.binarize, params.lr_schedule, params.epochs, params.iwae_samples) == (
            50, "dynamic", "burda", 3280, 5000)
        assert row.command().startswith("dvc exp run -S latent_dim=50 ")
    k50 = literature.BY_NAME["burda-iwae-k50"].params()
    assert (k50.architecture, k50.objective, k50.train_samples, k50.output_bias) == ("burda", "iwae", 50, "data_mean")
    paper, k1 = (literature.BY_NAME[name].params() for name in ("burda-vae-k1-paper", "burda-vae-k1"))
    assert (paper.batch_size, paper.val_size) == (20, 400)  # Burda et al.'s batch, and 59,600 training images
    assert dataclasses.replace(paper, batch_size=k1.batch_size, val_size=k1.val_size) == k1


def small_run(mnist, epochs=2):
    """A row of a few epochs on a few images, and the splits it trains on."""
    images, labels = mnist["train"].images, mnist["train"].labels
    splits = {"train": data.Split(images[:1000], labels[:1000]),
              "val": data.Split(images[1000:1200], labels[1000:1200]),
              "test": data.Split(mnist["test"].images[:500], mnist["test"].labels[:500])}
    row = literature.BY_NAME["burda-iwae-k5"]
    small = dataclasses.replace(row, changes={**row.changes, "epochs": epochs, "iwae_samples": 4, "batch_size": 100})
    return small, splits


def test_a_row_records_what_it_ran_and_what_it_measured(mnist, tmp_path):
    small, splits = small_run(mnist)
    record = literature.run(small, splits, "cpu", tmp_path / "checkpoints")
    assert record["params"]["architecture"] == "burda" and record["params"]["objective"] == "iwae"
    assert (record["epochs"], record["batch_size"], record["steps"], record["iwae_samples"]) == (2, 100, 20, 4)
    assert record["test_iwae_nll"] < record["test_neg_elbo"]  # K = 4 tightens the bound
    assert re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?", record["commit"])
    assert set(record["val_neg_elbo_at_stage_ends"]) == {"1"}  # of 1, 4, 13, ...: epoch 1 only
    assert record["resumed_at"] == []
    literature.append(record, tmp_path / "literature.json")
    literature.append(record, tmp_path / "literature.json")
    assert literature.read(tmp_path / "literature.json") == [record, record]


def test_the_docs_table_is_the_committed_record():
    shown = (REPO / "docs" / "literature.md").read_text()
    assert literature.table(literature.read(REPO / literature.RECORD)) in shown


def test_make_gpu_literature_runs_the_rows_the_record_lacks():
    """A GPU loan is short: its default spends none of it on a row already recorded, and misses none."""
    command = subprocess.run(["make", "-n", "-s", "gpu-literature"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    recorded = {record["name"] for record in literature.read(REPO / literature.RECORD)}
    assert command[command.index("cuda") + 1:] == [row.name for row in literature.ROWS if row.name not in recorded]


class Stop(Exception):
    """The end of a session, in the middle of a row's training."""


def test_a_stopped_row_continues_from_its_checkpoint_to_the_record_of_an_unstopped_one(mnist, tmp_path, monkeypatch):
    small, splits = small_run(mnist, epochs=4)
    unstopped = literature.run(small, splits, "cpu", tmp_path / "unstopped")
    monkeypatch.setattr(literature, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after each epoch
    train = training.train

    def stopped_after_epoch_3(*args, on_epoch, **kwargs):
        def stop_at_3(row):
            if row["epoch"] == 3:
                raise Stop
            on_epoch(row)
        return train(*args, on_epoch=stop_at_3, **kwargs)

    monkeypatch.setattr(training, "train", stopped_after_epoch_3)
    with pytest.raises(Stop):
        literature.run(small, splits, "cpu", tmp_path / "stopped")
    monkeypatch.setattr(training, "train", train)
    resumed = literature.run(small, splits, "cpu", tmp_path / "stopped")
    assert resumed["resumed_at"] == [2]  # epoch 3 stopped before its checkpoint
    measured = ("test_iwae_nll", "test_neg_elbo", "test_active_units", "val_neg_elbo_at_stage_ends")
    assert {key: resumed[key] for key in measured} == {key: unstopped[key] for key in measured}
    assert resumed["train_s"] > 0
    assert " min in 2 runs |" in literature.table([resumed]) and " runs |" not in literature.table([unstopped])
