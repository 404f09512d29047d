"""What a run holds besides its metrics, against a real SQLite store: the images MLflow's chart view shows per key
and step, sent once however often a stage runs, and the machine's use while it trained (system metrics)."""
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from vaelab import handoff, tracking
from vaelab.config import Params


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("snapshots, at_most, expected", [
    (3, 60, [0, 1, 2]), (59, 60, list(range(59))), (65, 5, [0, 16, 32, 48, 64]), (7, 4, [0, 2, 4, 6])])
def test_a_run_logs_every_snapshot_or_an_even_spread_from_the_first_to_the_last(snapshots, at_most, expected):
    assert handoff.image_steps(snapshots, at_most) == expected


def test_images_are_sent_once_per_key_and_step_however_often_the_stage_runs(store, tmp_path):
    with tracking.training_run(Params(epochs=1)) as run:
        handoff.write_run_id(tmp_path / "run.json", run.run_id)
    images = {"figures/manifold": [(1, Image.new("L", (8, 8), 0)), (5, Image.new("L", (8, 8), 255))],
              "latent/scatter": [(5, Image.fromarray(np.eye(8, dtype=np.uint8) * 255))]}
    for _ in range(2):  # render run again (dvc repro --force render), or a retry after a server came back
        handoff.add_to_run(tmp_path / "run.json", "the figures", images=images)
    files = [item.path for item in store.list_artifacts(run.run_id, "images")]
    assert len(files) == 2 * 3  # each image and MLflow's compressed copy of it, once
    assert handoff._logged_images(store, run.run_id) == {
        ("figures/manifold", 1), ("figures/manifold", 5), ("latent/scatter", 5)}
    assert store.get_run(run.run_id).data.tags["mlflow.loggedImages"] == "True"  # the chart view looks for it
    [five] = [path for path in files if path.startswith("images/figures~manifold+step+5+") and path.endswith(".png")]
    local = store.download_artifacts(run.run_id, five, str(tmp_path))
    assert np.asarray(Image.open(local)).min() == 255  # the image logged at step 5, not the one at step 1


def test_a_training_run_records_the_machines_use_about_every_second(store):
    with tracking.training_run(Params(epochs=1)) as run:
        time.sleep(3.5)
    history = store.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    assert 2 <= len(history) <= 5 and [point.step for point in history] == list(range(len(history)))
    keys = set(store.get_run(run.run_id).data.metrics)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= keys
