"""End to end, as a user runs it, in copies of this repository with the default MLflow store (mlflow.db at
the repository root), on real MNIST: `dvc repro`, `dvc exp run`, a queued experiment, a queued grid of 12 on
two workers, `vaelab compare`, and the MLflow UI in a real browser."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from projects import SMALL, Project, free_port, http_service, new_project, user_env

SWEEP = {"latent_dim": (2, 8, 16), "dropout": (0, 0.3), "optimizer": ("adam", "rmsprop")}  # issue 6's grid
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tmp_path_factory, mnist_dir):
    return new_project(tmp_path_factory.mktemp("project"), user_env(mnist_dir))


def _client(project: Project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _runs(project: Project):
    client = _client(project)
    experiment = client.get_experiment_by_name("vaelab")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def repro(project):
    project.run("dvc", "repro")
    return project


def test_repro_writes_sane_metrics(repro):
    metrics = json.loads((repro / "reports" / "metrics.json").read_text())
    assert 100 < metrics["test_neg_elbo"] < 500  # nats per image after 3 epochs at lr 1e-4
    assert metrics["test_reconstruction"] + metrics["test_kl"] == pytest.approx(metrics["test_neg_elbo"])
    assert metrics["test_seed_loss"] == pytest.approx(metrics["test_neg_elbo"] / 1568)
    assert 0 < metrics["test_mse_per_pixel"] < 0.25  # an early model; the default run reaches about 0.04
    assert 0 <= metrics["test_elbo_gap"] < 50 and metrics["test_iwae_nll"] <= metrics["test_neg_elbo"]
    assert metrics["test_active_units"] in (1, 2) and {"test_kl_z0", "test_kl_z1"} <= set(metrics)
    assert 0.2 < metrics["test_latent_classifier_accuracy"] <= 1
    assert all(100 < metrics[f"test_neg_elbo_digit_{d}"] < 600 for d in range(10))
    report = (repro / "reports" / "evaluation.md").read_text()
    assert "importance-sampled" in report and "not a probability" in report  # binarize: none's caveat
    shown = repro.run("dvc", "metrics", "show", "--json")
    assert "test_neg_elbo" in shown


def test_repro_renders_the_seeds_pictures(repro):
    figures = repro / "reports" / "figures"
    assert {p.name for p in figures.iterdir()} == {
        "reconstructions.png", "manifold.png", "manifold.gif", "latent_scatter.png", "latent_scatter.gif",
        "learning_curves.png",
    }
    for gif in ("manifold.gif", "latent_scatter.gif"):
        with Image.open(figures / gif) as image:
            assert image.n_frames == SMALL["epochs"]  # one frame per snapshot epoch: 1, 2, 3
    with Image.open(figures / "manifold.png") as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 20  # digits, not a blank page


def test_repro_logs_one_complete_mlflow_run(repro):
    runs = _runs(repro)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["latent_dim"] == "2" and run.data.params["optimizer"] == "adam"
    assert run.data.params["epochs"] == "3" and run.data.params["dropout"] == "0.3"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["vaelab.torch_threads"] == str(torch.get_num_threads())
    client = _client(repro)
    history = client.get_metric_history(run.info.run_id, "val_neg_elbo")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["test_neg_elbo"] == pytest.approx(
        json.loads((repro / "reports" / "metrics.json").read_text())["test_neg_elbo"])
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"manifold.gif", "latent_scatter.gif", "manifold.png", "learning_curves.png"} <= figures
    assert (repro / "mlartifacts").is_dir()

    mlflow.set_tracking_uri(f"sqlite:///{repro / 'mlflow.db'}")
    decoder = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = decoder.predict(np.zeros((2, 2), dtype=np.float32))
    assert images.shape == (2, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_repro_feeds_dvc_plots(repro):
    out = repro.run("dvc", "plots", "show", "--json")
    assert "val_neg_elbo" in out and "manifold.gif" in out


def test_editing_library_code_marks_exactly_the_stages_that_run_it(repro):
    assert json.loads(repro.run("dvc", "status", "--json")) == {}
    changed = {}
    for module in ("figures.py", "backprop.py"):
        path = repro / "src" / "vaelab" / module
        original = path.read_text()
        try:
            path.write_text(original + "# an edit\n")
            changed[module] = set(json.loads(repro.run("dvc", "status", "--json")))
        finally:
            path.write_text(original)
    assert changed == {"figures.py": {"render"}, "backprop.py": {"train", "render"}}
    assert json.loads(repro.run("dvc", "status", "--json")) == {}


def test_changing_an_evaluation_setting_re_evaluates_into_the_same_run(repro):
    out = repro.run("dvc", "exp", "run", "-S", "iwae_samples=30", "--name", "more-samples")
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    [run] = _runs(repro)
    assert "iwae_samples" not in run.data.params  # MLflow params cannot change; K is a metric beside the bound
    history = _client(repro).get_metric_history(run.info.run_id, "iwae_samples")
    assert [m.value for m in history] == [SMALL["iwae_samples"], 30]
    assert len(_client(repro).get_metric_history(run.info.run_id, "test_iwae_nll")) == 2


def test_experiment_and_queued_experiment_land_in_the_same_store(repro):
    repro.run("dvc", "exp", "run", "-S", "latent_dim=3", "--name", "wide")
    runs = _runs(repro)
    assert len(runs) == 2
    assert runs[-1].data.params["latent_dim"] == "3" and runs[-1].data.tags["dvc.exp_name"] == "wide"
    assert len(runs[-1].data.tags["dvc.exp_baseline_rev"]) == 40

    repro.run("dvc", "exp", "run", "--queue", "-S", "latent_dim=4", "--name", "queued")
    repro.run("dvc", "queue", "start")
    status = repro.wait_for_queue()
    assert "Success" in status, status
    runs = _runs(repro)
    assert len(runs) == 3
    queued = runs[-1]
    assert queued.info.status == "FINISHED" and queued.data.params["latent_dim"] == "4"
    assert queued.data.tags["dvc.exp_name"] == "queued"
    assert "test_neg_elbo" in queued.data.metrics
    artifacts = Path(queued.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(repro / "mlartifacts") and (artifacts / "figures" / "manifold.gif").exists()
    shown = repro.run("dvc", "exp", "show", "--json")
    assert "wide" in shown and "queued" in shown


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; no browser is downloaded by a test tool


@pytest.fixture
def mlflow_ui(repro, tmp_path):
    """`mlflow ui` on the project's store, on 127.0.0.1 at a free port, as the README starts it."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with http_service(command, f"http://127.0.0.1:{port}", repro.root, repro.env, tmp_path / "mlflow-ui.log") as url:
        yield url


def test_the_mlflow_ui_shows_the_runs_and_the_manifold_gif_in_a_real_browser(repro, mlflow_ui):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    experiment = _client(repro).get_experiment_by_name("vaelab")
    wide = next(run for run in _runs(repro) if run.data.tags.get("dvc.exp_name") == "wide")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs")  # training runs, not GenAI
        page.wait_for_selector("text=Training runs", timeout=60_000)
        page.wait_for_selector("text=queued", timeout=60_000)
        search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
        search.fill("params.latent_dim = '3'")
        search.press("Enter")
        page.wait_for_selector("text=queued", state="detached", timeout=30_000)  # latent_dim 4
        assert page.get_by_text("wide", exact=True).is_visible()  # latent_dim 3

        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{wide.info.run_id}"
                  "/artifacts/figures/manifold.gif")
        gif = page.wait_for_selector("img[src^='blob:']", timeout=60_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=gif, timeout=60_000)
        assert gif.evaluate("img => img.naturalWidth") > 100
        page.screenshot(path=str(repro / "reports" / "mlflow_ui.png"))
        browser.close()
    assert (repro / "reports" / "mlflow_ui.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_dir):
    """Issue 6's grid of 12, queued in a fresh project (no MLflow experiment yet) and run on two workers of
    one CPU thread each, as the README advises for a 2-core machine."""
    project = new_project(tmp_path_factory.mktemp("sweep"), user_env(mnist_dir), epochs=1)
    project.run("dvc", "exp", "run", "--queue", *(
        arg for key, values in SWEEP.items() for arg in ("-S", f"{key}={','.join(map(str, values))}")))
    Project(project.root, dict(project.env, OMP_NUM_THREADS="1")).run("dvc", "queue", "start", "-j", "2")
    status = project.wait_for_queue()
    assert "Failed" not in status, status
    return project


def test_a_queued_grid_on_two_workers_lands_every_experiment_once_and_complete(sweep):
    experiments = sweep.run("dvc", "exp", "list", "--name-only").split()
    shown = sweep.run("dvc", "exp", "show", "--json")
    assert len(experiments) == 12 and all(f'"{name}"' in shown for name in experiments)
    runs = _runs(sweep)
    grid = sorted((int(d), float(p), o) for d in SWEEP["latent_dim"] for p in SWEEP["dropout"] for o in SWEEP["optimizer"])
    assert sorted((int(r.data.params["latent_dim"]), float(r.data.params["dropout"]), r.data.params["optimizer"])
                  for r in runs) == grid  # none lost, none duplicated
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == sorted(experiments)
    assert {r.data.tags["vaelab.torch_threads"] for r in runs} == {"1"}  # OMP_NUM_THREADS reached every worker
    client = _client(sweep)
    for run in runs:
        assert run.info.status == "FINISHED" and "test_neg_elbo" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_neg_elbo")] == [1]
        figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {"manifold.gif", "latent_scatter.gif"} <= figures
    models = client.search_logged_models([runs[0].info.experiment_id])
    assert {m.source_run_id for m in models} == {run.info.run_id for run in runs}
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "vaelab"]  # one, not one per worker


def test_compare_reports_every_training_run_and_logs_the_report(sweep):
    out = sweep.run("vaelab", "compare")
    assert "12 runs compared" in out
    folder = sweep / "reports" / "compare"
    assert {p.name for p in folder.iterdir()} == {
        "runs.csv", "runs.md", "metrics_vs_latent_dim.png", "learning_curves.png", "manifolds.png"}
    table = pd.read_csv(folder / "runs.csv")
    assert len(table) == 12 and set(table["latent_dim"]) == set(SWEEP["latent_dim"])
    assert table["test_neg_elbo"].notna().all()
    [comparison] = [run for run in _runs(sweep) if run.data.tags.get("vaelab.kind") == "comparison"]
    logged = {Path(a.path).name for a in _client(sweep).list_artifacts(comparison.info.run_id, "compare")}
    assert logged == {p.name for p in folder.iterdir()}
    one = table["run"].iloc[0]  # filter by a tag: one DVC experiment
    assert "1 runs compared" in sweep.run("vaelab", "compare", "--no-log", "--tag", f"dvc.exp_name={one}")
    nothing = subprocess.run(["vaelab", "compare", "--tag", "dvc.exp_name=none-such"], cwd=sweep.root, env=sweep.env,
                             capture_output=True, text=True)
    assert nothing.returncode == 2 and "error: no finished training runs" in nothing.stderr
    assert "Traceback" not in nothing.stderr
