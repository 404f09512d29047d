"""`make ui` prints the page a newcomer should open: the runs table in MLflow 3's "Model training" view."""
import subprocess
import sys

from mlflow.tracking import MlflowClient


def _ui_link(cwd) -> str:
    out = subprocess.run([sys.executable, "-m", "vaelab.cli", "ui-link"], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_before_any_run_it_points_at_the_home_page_and_creates_no_store(tmp_path):
    assert _ui_link(tmp_path) == ("No runs in mlflow.db yet (run `dvc repro` first); the MLflow UI: "
                                  "http://127.0.0.1:5000")
    assert not (tmp_path / "mlflow.db").exists()


def test_it_links_the_experiments_runs_in_the_model_training_view(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("other")
    experiment_id = client.create_experiment("vaelab")
    assert _ui_link(tmp_path) == ("Open the experiment's runs: http://127.0.0.1:5000/#/experiments/"
                                  f"{experiment_id}/runs?workflowType=machine_learning")
