"""End to end, as a user runs it, in copies of this repository with the default MLflow store (mlflow.db at
the repository root), on real MNIST: `dvc repro`, `dvc exp run`, a queued experiment, a queued grid of latent
sizes and seeds on two workers, `vaelab compare`, and the MLflow UI in a real browser."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from projects import SMALL, Project, free_port, http_service, new_project, user_env

from vaelab.figures import MANIFOLD_GIF_GREYS
from vaelab.metrics import HEADLINE

SWEEP = {"latent_dim": (2, 8), "seed": (0, 1, 2)}  # the README's grid, at two latent sizes
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(module_tmp_path, mnist_dir):
    return new_project(module_tmp_path / "project", user_env(mnist_dir))


def _client(project: Project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _runs(project: Project):
    client = _client(project)
    experiment = client.get_experiment_by_name("vaelab")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


PICTURES = ("figures/manifold", "figures/latent_scatter", "figures/reconstructions")
IMAGE_BYTES_PER_STEP = 170_000  # docs/speed.md: what a step's three pictures may add to the store (10 MB / 60)


def _images(project: Project, run_id: str) -> tuple[dict[str, list[int]], int]:
    """The run's MLflow images: each key's steps (MLflow names each file images/<key>+step+<step>+..., a '/' in the
    key as '~'), and the bytes they take in the store, MLflow's compressed copies included."""
    files = _client(project).list_artifacts(run_id, "images")
    steps: dict[str, list[int]] = {}
    for item in files:
        key, _, step, *rest = Path(item.path).name.split("+")
        if rest[-1].endswith(".png") and "compressed" not in rest[-1]:
            steps.setdefault(key.replace("~", "/"), []).append(int(step))
    return {key: sorted(values) for key, values in steps.items()}, sum(item.file_size for item in files)


def _picture(project: Project, run_id: str, key: str, step: int) -> Image.Image:
    [path] = [item.path for item in _client(project).list_artifacts(run_id, "images")
              if item.path.startswith(f"images/{key.replace('/', '~')}+step+{step}+") and item.path.endswith(".png")
              and "compressed" not in item.path]
    return Image.open(_client(project).download_artifacts(run_id, path, str(project / "downloaded")))


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
    assert metrics["test_active_units"] in (1, 2)
    assert 0.2 < metrics["test_latent_classifier_accuracy"] <= 1
    assert set(metrics) == set(HEADLINE)  # per-digit and per-dimension values are DVC plots, not metrics
    per_digit = pd.read_csv(repro / "reports" / "per_digit.csv")
    assert per_digit["digit"].tolist() == list(range(10)) and per_digit["test_neg_elbo"].between(100, 600).all()
    per_dimension = pd.read_csv(repro / "reports" / "kl_per_dimension.csv")
    assert per_dimension["dimension"].tolist() == [0, 1] and (per_dimension["test_kl"] >= 0).all()
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
    commit = run.data.tags["mlflow.source.git.commit"]
    assert len(commit) == 40 and run.info.run_name == f"main@{commit[:7]}"  # branch and commit, not a random name
    assert {"test_per_digit/neg_elbo_digit_9", "test_per_dimension/kl_z1"} <= set(run.data.metrics)  # every number
    assert {"learning_curve/train_neg_elbo", "train_schedule/lr", "test/iwae_nll"} <= set(run.data.metrics)
    assert not [key for key in run.data.metrics if "/" not in key]  # each in its section of the run page
    assert run.data.tags["vaelab.torch_threads"] == str(torch.get_num_threads())
    client = _client(repro)
    history = client.get_metric_history(run.info.run_id, "learning_curve/val_neg_elbo")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["test/neg_elbo"] == pytest.approx(
        json.loads((repro / "reports" / "metrics.json").read_text())["test_neg_elbo"])
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"manifold.gif", "latent_scatter.gif", "manifold.png", "learning_curves.png"} <= figures
    assert (repro / "mlartifacts").is_dir()
    # the pictures as MLflow images, for the chart view: the untrained model at 0, then each snapshot epoch
    steps, size = _images(repro, run.info.run_id)
    assert steps == {key: [0, 1, 2, 3] for key in PICTURES} and size <= 4 * IMAGE_BYTES_PER_STEP
    with Image.open(repro / "reports" / "figures" / "manifold.png") as still:  # the last is the still, its greys
        last = np.asarray(_picture(repro, run.info.run_id, "figures/manifold", 3), dtype=int)  # rounded as the GIF's
        assert np.abs(last - np.asarray(still, dtype=int)).max() <= 255 / (MANIFOLD_GIF_GREYS - 1) / 2
    # the machine's use while it trained, a point a second
    usage = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sorted(point.step for point in usage) == list(range(len(usage))) and len(usage) >= 1
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= set(run.data.metrics)

    mlflow.set_tracking_uri(f"sqlite:///{repro / 'mlflow.db'}")
    decoder = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = decoder.predict(np.zeros((2, 2), dtype=np.float32))
    assert images.shape == (2, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_each_training_run_records_the_prepared_splits_it_trained_on_with_dvcs_hashes(repro):
    """The runs table's Dataset column: MLflow dataset inputs whose digests are the md5s DVC records."""
    [run] = _runs(repro)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-train", "mnist-val"]
    lock = yaml.safe_load((repro / "dvc.lock").read_text())
    [prepared] = [out for out in lock["stages"]["prepare"]["outs"] if out["path"] == "data/prepared"]
    digest = prepared["md5"].removesuffix(".dir")
    listing = json.loads((repro / ".dvc" / "cache" / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")).read_text())
    dvc_md5 = {entry["relpath"]: entry["md5"] for entry in listing}
    for split, context in (("train", "training"), ("val", "validation")):
        dataset = inputs[f"mnist-{split}"]
        assert dataset.dataset.digest == dvc_md5[f"{split}.pt"]
        assert json.loads(dataset.dataset.source) == {"uri": f"data/prepared/{split}.pt"}
        assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == context


def test_repro_feeds_dvc_plots(repro):
    out = repro.run("dvc", "plots", "show", "--json")
    assert "val_neg_elbo" in out and "manifold.gif" in out
    assert "per_digit.csv" in out and "kl_per_dimension.csv" in out


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
    assert changed == {"figures.py": {"render"}, "backprop.py": {"train"}}
    assert json.loads(repro.run("dvc", "status", "--json")) == {}


def test_changing_an_evaluation_setting_re_evaluates_into_the_same_run(repro):
    out = repro.run("dvc", "exp", "run", "-S", "iwae_samples=30", "--name", "more-samples")
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    [run] = _runs(repro)
    # MLflow params cannot change, so K, which a re-evaluation may change, is a tag beside the bound
    assert "iwae_samples" not in run.data.params and run.data.tags["iwae_samples"] == "30"
    assert len(_client(repro).get_metric_history(run.info.run_id, "test/iwae_nll")) == 2


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
    assert "test/neg_elbo" in queued.data.metrics
    artifacts = Path(queued.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(repro / "mlartifacts") and (artifacts / "figures" / "manifold.gif").exists()
    shown = repro.run("dvc", "exp", "show", "--json")
    assert "wide" in shown and "queued" in shown


def test_dvc_exp_show_has_the_same_few_metric_columns_for_every_latent_size(repro):
    """Experiments with 2, 3 and 4 latent dimensions: no ragged rows, no column per dimension or digit."""
    table = pd.read_csv(io.StringIO(repro.run("dvc", "exp", "show", "--csv")))
    metric_columns = [c for c in table.columns if c in HEADLINE or c.startswith("test_")]
    assert sorted(metric_columns) == sorted(HEADLINE) and len(metric_columns) <= 10
    finished = table[table["Experiment"].isin(["wide", "queued"])]
    assert len(finished) == 2 and finished[metric_columns].notna().all().all()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; no browser is downloaded by a test tool


@pytest.fixture
def mlflow_ui(repro, tmp_path):
    """`mlflow ui` on the project's store, on 127.0.0.1 at a free port, as `make ui` starts it. Without
    MLflow's background job runner, which the UI pages here do not use and whose worker processes would
    outlive the server when it is stopped with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**repro.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with http_service(command, f"http://127.0.0.1:{port}", repro.root, env, tmp_path / "mlflow-ui.log") as url:
        yield url


def test_the_mlflow_ui_shows_the_runs_and_the_manifold_gif_in_a_real_browser(repro, mlflow_ui, tmp_path):
    """A newcomer's path, in a fresh browser profile: the link the README gives (and `make ui` prints) opens
    the runs table, not MLflow 3's GenAI overview; a run, and back through the page's breadcrumb, is the
    runs table again; then the search filter; the grid's pictures side by side in the chart view, where the slider
    moves them through the epochs; and the manifold GIF. A screenshot of each step in tmp_path."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("needs Debian's chromium: apt-get install chromium")

    from playwright.sync_api import expect, sync_playwright

    experiment = _client(repro).get_experiment_by_name("vaelab")
    runs = {run.data.tags.get("dvc.exp_name"): run for run in _runs(repro)}
    wide, queued = runs["wide"], runs["queued"]  # latent_dim 3 and 4
    # the README's link, written for a fresh clone after `make repro`: a new store's first experiment is 1
    readme = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/(\d+)/runs\?workflowType=machine_learning)",
                       (repro / "README.md").read_text())
    assert readme, "the README gives the link to the runs table"
    assert readme[2] == experiment.experiment_id == "1"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1600, "height": 900})  # fresh: no remembered view
        page = context.new_page()
        page.goto(mlflow_ui + readme[1])
        # "Runs" in the "Model training" view; the GenAI view would show "Overview" (traces: 0)
        expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=60_000)
        for run_name in ("wide", "queued"):
            expect(page.get_by_role("link", name=run_name, exact=True)).to_be_visible(timeout=60_000)
        close_assistant = page.get_by_role("button", name="Close", exact=True)  # the MLflow Assistant opens
        if close_assistant.is_visible():                                         # on a first visit: table width
            close_assistant.click()
        page.get_by_role("button", name="Columns").click()  # parameters are hidden columns in MLflow 3
        page.get_by_text("latent_dim", exact=True).click()
        page.keyboard.press("Escape")
        expect(page.get_by_role("columnheader", name="latent_dim").first).to_be_visible()

        def latent_dim_cell(run):  # the grid's row of the run (row-id), the column of the parameter (col-id)
            return page.locator(f"[row-id='{run.info.run_id}'] [col-id='params.`latent_dim`']")

        expect(latent_dim_cell(wide)).to_have_text("3")
        expect(latent_dim_cell(queued)).to_have_text("4")
        page.screenshot(path=str(shots / "1-link-runs-table.png"))

        page.get_by_role("link", name="wide", exact=True).click()
        expect(page.get_by_role("heading", name="wide", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_role("row").filter(has_text="latent_dim")).to_contain_text("3")
        page.screenshot(path=str(shots / "2-run.png"))
        # the run's charts: the learning curves first, then the test numbers, the schedule apart at the end
        page.get_by_role("tab", name="Model metrics").click()
        sections = ["learning_curve", "test", "test_per_digit", "test_per_dimension", "train_schedule"]
        headings = [page.get_by_text(re.compile(rf"^{name} ?\(\d+\)$")).first for name in sections]
        for heading in headings:
            expect(heading).to_be_visible(timeout=60_000)
        tops = [heading.bounding_box()["y"] for heading in headings]
        assert tops == sorted(tops), dict(zip(sections, tops))
        expect(page.get_by_text(re.compile(r"^Model metrics ?\(0\)$")).first).to_be_visible()  # none unsectioned
        page.screenshot(path=str(shots / "2b-run-charts.png"))
        page.get_by_role("tab", name="Overview").click()

        page.get_by_role("main").get_by_role("link", name="vaelab", exact=True).click()  # the breadcrumb
        expect(page).to_have_url(re.compile(rf"#/experiments/{experiment.experiment_id}/runs(\?|$)"), timeout=60_000)
        # the same runs table ("Training runs" where MLflow has gone back to its GenAI view), not the overview
        expect(page.get_by_role("heading", name=re.compile(r"^(Training runs|Runs)$"))).to_be_visible(timeout=60_000)
        expect(page.get_by_role("heading", name="Overview", exact=True)).to_have_count(0)
        expect(latent_dim_cell(wide)).to_have_text("3", timeout=60_000)
        expect(latent_dim_cell(queued)).to_have_text("4")
        page.screenshot(path=str(shots / "3-breadcrumb-runs-table.png"))

        search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
        search.fill("params.latent_dim = '3'")
        search.press("Enter")
        page.wait_for_selector("text=queued", state="detached", timeout=30_000)  # latent_dim 4
        assert page.get_by_text("wide", exact=True).is_visible()  # latent_dim 3
        page.screenshot(path=str(shots / "4-search-filter.png"))

        # the grid's pictures side by side, as the README says: narrow the runs (MLflow's search has no IN for
        # parameters), then the chart view
        search.fill("params.latent_dim != '2'")
        search.press("Enter")
        expect(page.get_by_role("link", name="queued", exact=True)).to_be_visible(timeout=30_000)
        page.locator("label:has(input[value='CHART'])").click()  # the second of the view buttons
        cards = page.locator("[data-testid='experiment-view-compare-runs-card']")
        expect(page.get_by_text(re.compile(r"^figures ?\(3\)$")).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text(re.compile(r"^learning_curve ?\(\d+\)$")).first).to_be_visible()  # the curves too
        for key in ("manifold", "latent_scatter", "reconstructions"):
            expect(cards.filter(has_text=re.compile(rf"^(figures/)?{key}"))).to_have_count(1)
        page.screenshot(path=str(shots / "5-chart-view.png"))
        manifold = cards.filter(has_text=re.compile(r"^(figures/)?manifold"))
        # each run's column is as wide as its settings' text: without it the pictures stand side by side
        manifold.locator("[data-testid='experiment-view-compare-runs-card-menu']").click()
        page.get_by_role("menuitem", name="Configure").click()
        page.get_by_text("Show run parameters", exact=True).click()
        page.get_by_role("button", name="Save changes").click()
        manifold.locator("[data-component-id='fullscreen_button_chartcard']").click()
        dialog = page.get_by_role("dialog", name="figures/manifold")
        pictures = dialog.locator("img.rc-image-img")
        expect(pictures).to_have_count(2, timeout=60_000)  # each run's manifold at the slider's step
        expect(dialog).to_contain_text("wide")
        expect(dialog).to_contain_text("queued")

        def shown() -> list[tuple[str, str]]:
            """Each picture's run and step (MLflow names the file images/<key>+step+<step>+...) once it has loaded."""
            page.wait_for_function("imgs => imgs.every(img => img.complete && img.naturalWidth > 0)",
                                   arg=pictures.element_handles(), timeout=60_000)
            found = [re.search(r"step%2B(\d+)%2B.*run_uuid=(\w+)", img.get_attribute("src")).groups()
                     for img in pictures.all()]
            return sorted((run, step) for step, run in found)

        runs_shown = {wide.info.run_id, queued.info.run_id}
        assert shown() == sorted((run, "0") for run in runs_shown)  # the untrained models, where the card opens
        slider = dialog.get_by_role("slider")
        slider.focus()
        for _ in range(3):  # to the last epoch, mark by mark: the final manifolds
            page.keyboard.press("ArrowRight")
        expect(pictures.first).to_have_attribute("src", re.compile(r"step%2B3%2B"))
        assert shown() == sorted((run, "3") for run in runs_shown)
        boxes = [picture.bounding_box() for picture in pictures.all()]  # side by side, each whole in the window
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]
        assert all(box["x"] + box["width"] <= 1600 and box["y"] + box["height"] <= 900 for box in boxes)
        page.screenshot(path=str(shots / "6-manifolds-side-by-side.png"))
        page.keyboard.press("ArrowLeft")  # an earlier epoch: the earlier manifolds
        expect(pictures.first).to_have_attribute("src", re.compile(r"step%2B2%2B"))
        assert shown() == sorted((run, "2") for run in runs_shown)
        page.keyboard.press("Escape")

        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{wide.info.run_id}"
                  "/artifacts/figures/manifold.gif")
        gif = page.wait_for_selector("img[src^='blob:']", timeout=60_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=gif, timeout=60_000)
        # what the page shows is the run's GIF: its size, and a frame of it drawn where the page draws it
        with Image.open(repro / "reports" / "figures" / "manifold.gif") as animation:
            frames = []
            for index in range(animation.n_frames):
                animation.seek(index)
                frames.append(np.asarray(animation.convert("L"), dtype=int))
        assert gif.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [frames[0].shape[1], frames[0].shape[0]]
        box = gif.bounding_box()
        assert (round(box["width"]), round(box["height"])) == (frames[0].shape[1], frames[0].shape[0])  # unscaled
        drawn = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L"), dtype=int)
        assert min(np.abs(drawn - frame).mean() for frame in frames) < 2  # grey levels, of 255
        page.screenshot(path=str(shots / "7-manifold-gif.png"))
        browser.close()


@pytest.fixture(scope="module")
def conditional(repro):
    """A conditional VAE as a user asks for one, after the project's other experiments (which left latent_dim 3 in
    params.yaml: `dvc exp run` applies an experiment to the workspace)."""
    repro.run("dvc", "exp", "run", "-S", "conditional=true", "-S", "latent_dim=2", "--name", "cvae")
    return repro


def test_a_conditional_experiment_bounds_log_p_x_over_the_labels_and_draws_each_digit(conditional):
    metrics = json.loads((conditional / "reports" / "metrics.json").read_text())
    assert set(metrics) == set(HEADLINE) | {"test_iwae_nll_given_label"}
    assert metrics["test_iwae_nll"] <= metrics["test_iwae_nll_given_label"] + np.log(10)
    assert metrics["test_elbo_gap"] == pytest.approx(metrics["test_neg_elbo"] - metrics["test_iwae_nll_given_label"])
    report = (conditional / "reports" / "evaluation.md").read_text()
    assert "Only `test_iwae_nll`" in report and "do not compare with an unconditional run's" in report
    figures = conditional / "reports" / "figures"
    assert {p.name for p in figures.iterdir()} == {
        "reconstructions.png", "manifold_per_digit.png", "manifold.gif", "style_transfer.png", "latent_scatter.png",
        "latent_scatter.gif", "learning_curves.png"}
    with Image.open(figures / "manifold.gif") as image:
        assert image.n_frames == SMALL["epochs"] and image.width > 5 * 140  # the ten panels, as it trains
    plots = json.loads(conditional.run("dvc", "plots", "show", "--json"))
    assert {"reports/figures/manifold_per_digit.png", "reports/figures/style_transfer.png"} <= set(plots["data"])
    assert not plots.get("errors")

    [run] = [r for r in _runs(conditional) if r.data.tags.get("dvc.exp_name") == "cvae"]
    assert run.data.params["conditional"] == "True" and run.data.metrics["test/iwae_nll_given_label"] > 0
    steps, _ = _images(conditional, run.info.run_id)
    assert steps == {key: [0, 1, 2, 3] for key in PICTURES}
    panels = _picture(conditional, run.info.run_id, "figures/manifold", 3)  # the ten digits' panels, as the GIF's
    with Image.open(figures / "manifold.gif") as gif:
        gif.seek(gif.n_frames - 1)
        assert np.array_equal(np.asarray(panels.convert("RGB")), np.asarray(gif.convert("RGB")))
    mlflow.set_tracking_uri(f"sqlite:///{conditional / 'mlflow.db'}")
    decoder = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    drawn = decoder.predict({"z": np.zeros((3, 2), dtype=np.float32), "label": np.array([0, 5, 9])})
    assert drawn.shape == (3, 28, 28) and not np.allclose(drawn[0], drawn[1])  # one z, the digit chosen
    with pytest.raises(Exception, match="missing inputs"):
        decoder.predict(np.zeros((2, 2), dtype=np.float32))  # latent vectors without labels


def test_compare_groups_a_conditional_run_apart_from_the_unconditional_ones(conditional):
    conditional.run("vaelab", "compare", "--no-log")
    folder = conditional / "reports" / "compare"
    groups = pd.read_csv(folder / "groups.csv")
    assert sorted(groups["conditional"].astype(str)) == ["False"] * (len(groups) - 1) + ["True"]
    differences = pd.read_csv(folder / "differences.csv")
    against = differences[differences["parameter"] == "conditional"]
    assert {"test_iwae_nll", "test_kl", "test_active_units", "test_latent_classifier_accuracy"} <= set(
        against["metric"])
    assert "test_iwae_nll_given_label" not in set(against["metric"])  # the unconditional runs have none


def test_a_non_boolean_conditional_is_refused_before_any_work(conditional):
    result = subprocess.run(["dvc", "exp", "run", "-S", "conditional=maybe"], cwd=conditional.root,
                            env=conditional.env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "error: params.yaml: conditional: 'maybe' is not allowed; expected true or false" in output


LITERATURE_SETTINGS = {"conditional": "false", "architecture": "burda", "dropout": "0", "objective": "iwae",
                       "train_samples": "3", "output_bias": "data_mean", "binarize": "dynamic"}


@pytest.fixture(scope="module")
def burda_iwae(conditional):
    """Burda et al.'s network trained with IWAE, k = 3, and the data's output bias, as a user asks for it."""
    settings = [arg for key, value in LITERATURE_SETTINGS.items() for arg in ("-S", f"{key}={value}")]
    conditional.run("dvc", "exp", "run", *settings, "--name", "burda-iwae")
    return conditional


def test_burdas_network_with_iwae_trains_evaluates_and_logs_its_settings_and_objective(burda_iwae):
    metrics = json.loads((burda_iwae / "reports" / "metrics.json").read_text())
    assert set(metrics) == set(HEADLINE) and metrics["test_iwae_nll"] < metrics["test_neg_elbo"]
    [run] = [r for r in _runs(burda_iwae) if r.data.tags.get("dvc.exp_name") == "burda-iwae"]
    assert {key: run.data.params[key] for key in ("architecture", "objective", "train_samples", "output_bias")} == {
        "architecture": "burda", "objective": "iwae", "train_samples": "3", "output_bias": "data_mean"}
    client = _client(burda_iwae)
    objective, elbo = (client.get_metric_history(run.info.run_id, f"learning_curve/train_{key}")
                       for key in ("objective", "neg_elbo"))
    assert len(objective) == SMALL["epochs"] and all(o.value < e.value for o, e in zip(objective, elbo))
    mlflow.set_tracking_uri(f"sqlite:///{burda_iwae / 'mlflow.db'}")
    drawn = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(np.zeros((2, 2), dtype=np.float32))
    assert drawn.shape == (2, 28, 28)
    burda_iwae.run("vaelab", "compare", "--no-log")
    groups = pd.read_csv(burda_iwae / "reports" / "compare" / "groups.csv")
    assert "burda" in set(groups["architecture"]) and "iwae" in set(groups["objective"])
    assert "seed" in set(groups["architecture"])  # runs logged before, or without, the setting: the seed's network


def test_burdas_network_with_the_seeds_dropout_is_refused_before_any_work(burda_iwae):
    result = subprocess.run(["dvc", "exp", "run", "-S", "dropout=0.3", "-S", "architecture=burda"], cwd=burda_iwae.root,
                            env=burda_iwae.env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert ("error: params.yaml: dropout: 0.3 does not apply to architecture: burda (Burda et al.'s network has no "
            "dropout); set dropout: 0, or architecture: seed") in output


@pytest.fixture(scope="module")
def sweep(module_tmp_path, mnist_dir):
    """A grid of latent sizes and seeds, queued in a fresh project (no MLflow experiment yet) and run on two
    workers of one CPU thread each, as the README advises for a 2-core machine."""
    project = new_project(module_tmp_path / "sweep", user_env(mnist_dir), epochs=1)
    project.run("dvc", "exp", "run", "--queue", *(
        arg for key, values in SWEEP.items() for arg in ("-S", f"{key}={','.join(map(str, values))}")))
    Project(project.root, dict(project.env, OMP_NUM_THREADS="1")).run("dvc", "queue", "start", "-j", "2")
    status = project.wait_for_queue()
    assert "Failed" not in status, status
    return project


def test_a_queued_grid_on_two_workers_lands_every_experiment_once_and_complete(sweep):
    experiments = sweep.run("dvc", "exp", "list", "--name-only").split()
    shown = sweep.run("dvc", "exp", "show", "--json")
    assert len(experiments) == 6 and all(f'"{name}"' in shown for name in experiments)
    runs = _runs(sweep)
    grid = sorted((d, s) for d in SWEEP["latent_dim"] for s in SWEEP["seed"])
    assert sorted((int(r.data.params["latent_dim"]), int(r.data.params["seed"])) for r in runs) == grid  # once each
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == sorted(experiments)
    assert {r.data.tags["vaelab.torch_threads"] for r in runs} == {"1"}  # OMP_NUM_THREADS reached every worker
    client = _client(sweep)
    for run in runs:
        assert run.info.status == "FINISHED" and "test/neg_elbo" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "learning_curve/val_neg_elbo")] == [1]
        figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {"manifold.gif", "latent_scatter.gif"} <= figures
    models = client.search_logged_models([runs[0].info.experiment_id])
    assert {m.source_run_id for m in models} == {run.info.run_id for run in runs}
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "vaelab"]  # one, not one per worker


def test_the_readmes_exp_show_line_shows_the_grids_settings_and_bounds_in_a_120_column_terminal(sweep):
    """The README's daily `dvc exp show` in a terminal of 120 columns (a pseudo-terminal, as a person has):
    the varied parameters and the two bounds, nothing cut to '…' (plain `dvc exp show` cuts them behind
    Created, State, Executor and the hashes of the data and code)."""
    readme = (sweep / "README.md").read_text()
    [command] = re.findall(r"^(dvc exp show --only-changed .*?\\\n\s+--drop '[^']*')", readme, re.MULTILINE)
    command = command.replace("\\\n", " ")
    shown = subprocess.run(["script", "-qec", f"stty cols 120 rows 50; {command}", "/dev/null"], cwd=sweep.root,
                           env={**sweep.env, "DVC_PAGER": "cat"}, capture_output=True, text=True, timeout=300)
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", shown.stdout).replace("\r", "").splitlines()
    assert shown.returncode == 0 and max(len(line) for line in lines) <= 120, shown.stdout
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == ["Experiment", "test_neg_elbo", "test_iwae_nll", "latent_dim", "seed"]
    assert "…" not in shown.stdout and sum(line.lstrip().startswith(("├", "└")) for line in lines) == 6


def test_compare_groups_the_seeds_and_reports_what_mlflow_holds(sweep):
    out = sweep.run("vaelab", "compare")
    assert "6 runs compared (2 groups" in out
    folder = sweep / "reports" / "compare"
    assert {p.name for p in folder.iterdir()} == {
        "runs.csv", "runs.md", "groups.csv", "groups.md", "differences.csv", "differences.md",
        "metrics_vs_latent_dim.png", "learning_curves.png", "manifolds.png"}
    table = pd.read_csv(folder / "runs.csv")
    assert len(table) == 6 and set(table["latent_dim"]) == set(SWEEP["latent_dim"])
    groups = pd.read_csv(folder / "groups.csv")
    assert sorted(groups["latent_dim"]) == [2, 8] and groups["n"].tolist() == [3, 3]
    for row in groups.itertuples():
        values = [r.data.metrics["test/neg_elbo"] for r in _runs(sweep)
                  if r.data.params.get("latent_dim") == str(row.latent_dim) and "vaelab.kind" not in r.data.tags]
        assert len(values) == 3  # computed here, independently, from MLflow
        assert row.test_neg_elbo_mean == pytest.approx(np.mean(values))
        assert row.test_neg_elbo_std == pytest.approx(np.std(values, ddof=1))
    differences = pd.read_csv(folder / "differences.csv")
    assert set(differences["parameter"]) == {"latent_dim"} and set(differences["test"]) == {"Welch's t-test"}
    [comparison] = [run for run in _runs(sweep) if run.data.tags.get("vaelab.kind") == "comparison"]
    logged = {Path(a.path).name for a in _client(sweep).list_artifacts(comparison.info.run_id, "compare")}
    assert logged == {p.name for p in folder.iterdir()}
    steps, _ = _images(sweep, comparison.info.run_id)  # and its figures as images, shown on the run's page
    assert steps == {f"compare/{p.stem}": [0] for p in folder.glob("*.png")}
    one = table["run"].iloc[0]  # filter by a tag: one DVC experiment
    assert "1 runs compared" in sweep.run("vaelab", "compare", "--no-log", "--tag", f"dvc.exp_name={one}")
    nothing = subprocess.run(["vaelab", "compare", "--tag", "dvc.exp_name=none-such"], cwd=sweep.root, env=sweep.env,
                             capture_output=True, text=True)
    assert nothing.returncode == 2 and "error: no finished training runs" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def test_compare_names_a_run_trained_but_never_evaluated_and_leaves_it_out(sweep):
    """`dvc exp run train` alone beside the grid's finished runs: a finished run without test metrics or K."""
    sweep.run("dvc", "exp", "run", "train", "--name", "trained-only")
    [run] = [r for r in _runs(sweep) if r.data.tags.get("dvc.exp_name") == "trained-only"]
    assert run.info.status == "FINISHED" and not any(key.startswith("test/") for key in run.data.metrics)
    out = sweep.run("vaelab", "compare", "--no-log")
    assert "6 runs compared (2 groups" in out
    assert f"- trained-only ({run.info.run_id}): not evaluated (no test metrics)" in out.splitlines()
    folder = sweep / "reports" / "compare"
    assert pd.read_csv(folder / "groups.csv")["n"].tolist() == [3, 3]
    runs = pd.read_csv(folder / "runs.csv").set_index("run")
    assert runs.at["trained-only", "left_out"] == "not evaluated (no test metrics)"
    assert runs["left_out"].isna().sum() == 6


def test_params_yaml_is_read_as_dvc_reads_it_through_the_stages_and_dvc_exp_run(sweep):
    """YAML 1.2, as DVC: a rate written by hand as `3e-4` trains at 0.0003 and DVC records that number, where YAML
    1.1 read a string; `conditional: yes` is the string 'yes' to both, refused in one line before any work."""
    params = sweep / "params.yaml"
    params.write_text(re.sub(r"(?m)^lr: .*$", "lr: 3e-4", params.read_text()))
    sweep.run("dvc", "exp", "run", "train", "--name", "rate-by-hand")
    sweep.run("dvc", "exp", "run", "train", "-S", "lr=5e-4", "--name", "rate-by-s")
    runs = {run.data.tags.get("dvc.exp_name"): run for run in _runs(sweep)}
    assert (runs["rate-by-hand"].data.params["lr"], runs["rate-by-s"].data.params["lr"]) == ("0.0003", "0.0005")
    recorded = {row["Experiment"]: row["lr"] for row in pd.read_csv(
        io.StringIO(sweep.run("dvc", "exp", "show", "--csv", "--only-changed"))).to_dict("records")}
    assert (recorded["rate-by-hand"], recorded["rate-by-s"]) == (0.0003, 0.0005)

    params.write_text(re.sub(r"(?m)^conditional: .*$", "conditional: yes", params.read_text()))
    for command in (["python", "pipeline/train.py", "data/prepared", "models", "reports/history.csv"],
                    ["dvc", "exp", "run", "-S", "conditional=yes"]):
        result = subprocess.run(command, cwd=sweep.root, env={**sweep.env, "PYTHONPATH": "src"}, capture_output=True,
                                text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert "error: params.yaml: conditional: 'yes' is not allowed; expected true or false" in (
            result.stdout + result.stderr)


def test_the_same_point_queued_twice_trains_twice_at_once_each_with_its_checkpoint_and_run(sweep):
    """The same point queued twice (a grid queued before and after a fix, say) on two workers at once: each training
    holds a checkpoint of its own and logs to an MLflow run of its own, and both end as one training would."""
    sweep.run("git", "checkout", "params.yaml")
    for name in ("twin-a", "twin-b"):
        sweep.run("dvc", "exp", "run", "--queue", "-S", "latent_dim=7", "-S", "epochs=3", "--name", name)
    workers = dict(sweep.env, OMP_NUM_THREADS="1", VAELAB_CHECKPOINT_SECONDS="0")  # a checkpoint every epoch
    Project(sweep.root, workers).run("dvc", "queue", "start", "-j", "2")
    assert "Failed" not in sweep.wait_for_queue()
    runs = {run.data.tags.get("dvc.exp_name"): run.info for run in _runs(sweep) if run.data.params.get("latent_dim") == "7"}
    assert sorted(runs) == ["twin-a", "twin-b"] and {run.status for run in runs.values()} == {"FINISHED"}
    a, b = runs.values()
    assert a.start_time < b.end_time and b.start_time < a.end_time  # they trained at the same time
    shown = pd.read_csv(io.StringIO(sweep.run("dvc", "exp", "show", "--csv"))).set_index("Experiment")
    assert shown.at["twin-a", "test_neg_elbo"] == shown.at["twin-b", "test_neg_elbo"]
    assert not list((sweep / ".vaelab" / "checkpoints").glob("*/state.pt"))  # each removed its own, and only its own
