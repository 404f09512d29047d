"""`vaelab compare`'s statistics on hand-made runs tables shaped like `compare.table` (parameters as the strings
MLflow returns, final metrics as floats): groups of seeds, their n, mean, std and interval, Welch's test between
settings that differ in one parameter and its Benjamini-Hochberg q, and the runs left out. No MLflow but for the
last tests: the figures get their histories as data; the manifolds are read from a real local store."""
import math
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from vaelab import compare
from vaelab.stages import StageError

SETTING = {"latent_dim": "2", "dropout": "0.3", "optimizer": "adam", "lr": "0.0001", "lr_schedule": "constant",
           "beta": "1.0", "kl_warmup_epochs": "0", "batch_size": "500", "epochs": "3", "binarize": "none"}


def _runs(*settings: tuple[dict, list[float]]) -> pd.DataFrame:
    """One run per value: each (changes to SETTING or K, test_neg_elbo of its seeds 0, 1, ...), evaluated at K = 500
    and finished an hour after the one before; other metrics derived."""
    rows = []
    for changes, values in settings:
        for seed, value in enumerate(values):
            i = len(rows)
            finished = pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(hours=i)
            rows.append({"run": f"run-{i}", "run_id": f"id{i}", "finished": finished, **SETTING, "iwae_samples": "500",
                         **changes, "seed": str(seed),
                         "test_neg_elbo": value, "test_iwae_nll": value - 5.0, "test_elbo_gap": 5.0,
                         "test_active_units": 2.0, "test_latent_classifier_accuracy": 0.8,
                         "test_mse_per_pixel": value / 1000})
    return pd.DataFrame(rows)


def _group(summary: pd.DataFrame, **params) -> pd.Series:
    [row] = [row for _, row in summary.iterrows() if all(row[p] == v for p, v in params.items())]
    return row


def test_runs_that_differ_only_in_seed_are_one_group_with_their_mean_std_and_interval():
    values = [100.0, 102.5, 107.0]
    frame = _runs(({}, values), ({"latent_dim": "8"}, [90.0]))
    frame["dropout"] = frame["dropout"].astype(object)
    frame.loc[1, "dropout"] = 0.3  # a number where MLflow gives "0.3": the same setting
    summary = compare.summarize(frame)
    assert len(summary) == 2
    group = _group(summary, latent_dim="2")
    assert group["n"] == 3 and group["test_neg_elbo_n"] == 3 and group["seeds"] == "0 1 2"
    mean, std = statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, df=2) * std / math.sqrt(3)
    assert group["test_neg_elbo_mean"] == pytest.approx(mean)
    assert group["test_neg_elbo_std"] == pytest.approx(std)
    assert (group["test_neg_elbo_ci95_low"], group["test_neg_elbo_ci95_high"]) == pytest.approx((mean - half,
                                                                                                 mean + half))
    assert half == pytest.approx(8.81, abs=0.01)  # 4.303 * 3.547 / 1.732: t with 2 df, not the normal's 1.96


def test_a_group_of_one_run_has_n_1_and_no_std_or_interval():
    frame = _runs(({}, [100.0, 101.0]), ({"latent_dim": "8"}, [90.0]))
    single = _group(compare.summarize(frame), latent_dim="8")
    assert single["n"] == 1 and single["test_neg_elbo_mean"] == 90.0
    assert all(np.isnan(single[f"test_neg_elbo_{s}"]) for s in ("std", "ci95_low", "ci95_high"))
    section = compare.groups_markdown(compare.summarize(frame), compare.left_out(frame)).split(
        "## test_neg_elbo")[1].split("##")[0]
    [row] = [line for line in section.splitlines() if line.startswith("| g2")]
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["g2", "8", "1", "90", "", "", ""]  # blank, not 0
    [diff] = compare.differences(frame)[lambda d: d["metric"] == "test_neg_elbo"].to_dict("records")
    assert diff["verdict"] == "n too small" and np.isnan(diff["p_value"]) and (diff["n_a"], diff["n_b"]) == (2, 1)


def test_settings_that_differ_in_two_parameters_are_neither_averaged_nor_compared():
    frame = _runs(({"latent_dim": "2", "dropout": "0.0"}, [150.0, 151.0]),
                  ({"latent_dim": "8", "dropout": "0.3"}, [110.0, 112.0]))
    summary = compare.summarize(frame)
    assert sorted(summary["test_neg_elbo_mean"]) == [111.0, 150.5]
    assert compare.differences(frame).empty
    both = pd.concat([frame, _runs(({"latent_dim": "8", "dropout": "0.0"}, [120.0, 121.0]))], ignore_index=True)
    pairs = compare.differences(both)[lambda d: d["metric"] == "test_neg_elbo"]
    assert sorted(zip(pairs["parameter"], pairs["value_a"], pairs["value_b"])) == [("dropout", "0", "0.3"),
                                                                                  ("latent_dim", "2", "8")]


def test_a_parameter_a_run_lacks_is_a_value_of_its_own():
    frame = _runs(({}, [100.0, 101.0]), ({"binarize": None}, [100.0, 101.0]))
    summary = compare.summarize(frame)
    assert sorted(summary["binarize"]) == [compare.MISSING, "none"] and list(summary["n"]) == [2, 2]


def test_groups_follow_the_numbers_not_the_strings():
    frame = _runs(({"latent_dim": "16"}, [1.0]), ({"latent_dim": "2"}, [2.0]), ({"latent_dim": "8.0"}, [3.0]),
                  ({"latent_dim": 8}, [4.0]))
    summary = compare.summarize(frame)
    assert list(zip(summary["group"], summary["latent_dim"], summary["n"])) == [("g1", "2", 1), ("g2", "8", 2),
                                                                                ("g3", "16", 1)]


def test_welch_matches_scipy_and_the_verdict_follows_the_separation():
    low, high = [100.0, 101.0, 102.5], [108.0, 115.0, 121.0, 110.0]  # unequal n and spread: Welch, not Student
    [row] = compare.differences(_runs(({}, low), ({"latent_dim": "8"}, high)))[
        lambda d: d["metric"] == "test_neg_elbo"].to_dict("records")
    expected = stats.ttest_ind(high, low, equal_var=False)
    assert (row["t"], row["p_value"]) == pytest.approx((expected.statistic, expected.pvalue))  # t and d: b - a
    va, vb = statistics.variance(low) / 3, statistics.variance(high) / 4  # by hand: Welch-Satterthwaite
    t = (statistics.mean(high) - statistics.mean(low)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert row["p_value"] != pytest.approx(stats.ttest_ind(high, low).pvalue)
    assert row["difference"] == pytest.approx(statistics.mean(high) - statistics.mean(low))
    assert row["p_value"] < 0.05 and row["verdict"] == "differs beyond seed noise"
    assert (row["test"], row["n_a"], row["n_b"]) == ("Welch's t-test", 3, 4)

    overlapping = _runs(({}, [100.0, 105.0, 110.0]), ({"latent_dim": "8"}, [101.0, 106.0, 109.0]))
    [overlap] = compare.differences(overlapping)[lambda d: d["metric"] == "test_neg_elbo"].to_dict("records")
    assert overlap["p_value"] > 0.05 and overlap["verdict"] == "within seed noise"


def test_benjamini_hochberg_q_values_by_hand():
    p = pd.Series([0.01, 0.04, 0.03, 0.20, np.nan])
    # sorted 0.01 0.03 0.04 0.20, m = 4 tests (NaN is no test): m p / rank = 0.04 0.06 0.0533 0.20, then each the
    # smallest of itself and those after it
    assert compare.benjamini_hochberg(p).tolist()[:4] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
    assert np.isnan(compare.benjamini_hochberg(p)[4])


def test_the_verdict_follows_q_over_every_test_of_the_report():
    frame = _runs(({}, [100.0, 101.0, 102.0]), ({"latent_dim": "8"}, [110.0, 111.0, 112.0]))
    frame["test_iwae_nll"] = [100.0, 101.0, 102.0, 102.5, 104.0, 105.0]
    frame["test_kl"] = [5.0, 6.0, 7.0, 5.5, 6.5, 6.6]
    frame["test_latent_classifier_accuracy"] = 0.75  # exact in binary: the same mean in both, no test
    diffs = compare.differences(frame).set_index("metric")
    p_elbo, p_iwae, p_kl = (diffs.at[m, "p_value"] for m in ("test_neg_elbo", "test_iwae_nll", "test_kl"))
    assert diffs.at["test_mse_per_pixel", "p_value"] == pytest.approx(p_elbo)  # value / 1000: the same test
    assert p_elbo < 0.001 < p_iwae < 0.05 < p_kl
    # 4 tests: the gap, active units and classifier accuracy are the same in every run (p NaN, no test, no q)
    assert diffs.loc[["test_elbo_gap", "test_active_units", "test_latent_classifier_accuracy"], "q_value"].isna().all()
    # by hand, ranks 1 to 4 (p_elbo twice): m p / rank = 4 p_elbo, 2 p_elbo, 4 p_iwae / 3, p_kl
    assert diffs.at["test_neg_elbo", "q_value"] == pytest.approx(2 * p_elbo)
    assert diffs.at["test_mse_per_pixel", "q_value"] == pytest.approx(2 * p_elbo)
    assert diffs.at["test_iwae_nll", "q_value"] == pytest.approx(4 * p_iwae / 3) == pytest.approx(0.0540, abs=1e-4)
    assert diffs.at["test_kl", "q_value"] == pytest.approx(p_kl)
    assert diffs.at["test_neg_elbo", "verdict"] == "differs beyond seed noise"
    assert diffs.at["test_iwae_nll", "verdict"] == "within seed noise"  # p 0.040 alone would have said "differs"
    text = compare.differences_markdown(compare.differences(frame), compare.summarize(frame))
    assert "Benjamini-Hochberg" in text and "No correction" not in text


def test_runs_evaluated_at_different_k_are_never_pooled_and_a_pair_differing_in_k_says_so():
    frame = _runs(({}, [100.0, 101.0]), ({"iwae_samples": "5000"}, [98.0, 99.0]), ({"iwae_samples": None}, [97.0]))
    summary = compare.summarize(frame)
    assert list(zip(summary["iwae_samples"], summary["n"])) == [("500", 2), ("5000", 2), (compare.MISSING, 1)]
    pairs = compare.differences(frame)[lambda d: d["metric"] == "test_iwae_nll"]
    assert list(zip(pairs["parameter"], pairs["value_a"], pairs["value_b"], pairs["verdict"])) == [
        ("iwae_samples", "500", "5000", "within seed noise"), ("iwae_samples", "500", compare.MISSING, "n too small"),
        ("iwae_samples", "5000", compare.MISSING, "n too small")]


def test_a_setting_and_seed_run_several_times_counts_once_the_latest_finished(tmp_path):
    frame = _runs(({}, [100.0, 101.0, 102.0]), ({}, [150.0, 101.5]))  # run-3, run-4: seeds 0 and 1 again, later
    frame.loc[4, "finished"] = frame.loc[1, "finished"] - pd.Timedelta(hours=1)  # run-4 finished before run-1
    left = compare.left_out(frame)
    assert left[["run", "run_id", "reason", "group", "seed", "counted"]].values.tolist() == [
        ["run-0", "id0", compare.SUPERSEDED, "g1", "0", "run-3 (id3)"],
        ["run-4", "id4", compare.SUPERSEDED, "g1", "1", "run-1 (id1)"]]
    points = pd.DataFrame([(run_id, 1, 300.0) for run_id in frame["run_id"]], columns=["run_id", "step", "value"])
    summary, diffs, left = compare.write_report(frame, points, tmp_path)
    [group] = summary.to_dict("records")
    assert (group["n"], group["seeds"], group["runs"]) == (3, "0 1 2", "run-1 run-2 run-3")
    assert group["test_neg_elbo_mean"] == pytest.approx((150.0 + 101.0 + 102.0) / 3)  # each seed once
    groups_md = (tmp_path / "groups.md").read_text()
    assert "3 runs in 1 groups, 2 left out (below)." in groups_md
    assert "| g1    | 0    | run-3 (id3) | run-0 (id0) |" in groups_md  # group, seed, counted, left out
    assert groups_md in compare.console(summary, diffs, left, tmp_path)
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert runs["left_out"].fillna("").tolist() == [compare.SUPERSEDED, "", "", "", compare.SUPERSEDED]


def test_conditional_and_unconditional_groups_are_tested_only_on_what_means_the_same_for_both():
    frame = _runs(({"conditional": "False"}, [157.0, 158.0, 156.5]), ({"conditional": "True"}, [137.0, 137.5, 137.2]))
    frame["test_kl"] = [5.0, 5.1, 5.05, 3.9, 3.95, 3.92]
    frame["test_latent_classifier_accuracy"] = [0.55, 0.52, 0.56, 0.15, 0.14, 0.16]
    frame["test_iwae_nll_given_label"] = [np.nan] * 3 + [136.5, 136.6, 136.7]
    diffs = compare.differences(frame).set_index("metric")
    assert set(diffs["parameter"]) == {"conditional"} and "test_iwae_nll_given_label" not in diffs.index
    tested = ["test_iwae_nll", "test_active_units", "test_latent_classifier_accuracy"]
    assert diffs.loc[tested, "verdict"].tolist() == ["differs beyond seed noise", "within seed noise",
                                                     "differs beyond seed noise"]
    given_the_label = ["test_neg_elbo", "test_kl", "test_elbo_gap", "test_mse_per_pixel"]
    unlike = diffs.loc[given_the_label]
    assert (unlike["verdict"] == "not comparable").all() and (unlike["test"] == "").all()
    assert unlike[["difference", "t", "p_value", "q_value"]].isna().all().all()
    # the q are over the 1 + 1 tests with a p (active units are 2 in every run: no test)
    p_iwae, p_accuracy = diffs.loc[["test_iwae_nll", "test_latent_classifier_accuracy"], "p_value"]
    assert diffs.at["test_iwae_nll", "q_value"] == pytest.approx(max(p_iwae, p_accuracy))
    text = compare.differences_markdown(compare.differences(frame), compare.summarize(frame))
    assert "4 are not comparable" in text


def test_a_run_never_evaluated_is_named_and_left_out_of_the_statistics(tmp_path):
    frame = _runs(({}, [100.0, 101.0]), ({"latent_dim": "8"}, [90.0]))
    frame.loc[2, compare.FINAL_METRICS[:1] + ["test_iwae_nll", "test_elbo_gap", "test_active_units",
                                              "test_latent_classifier_accuracy", "test_mse_per_pixel"]] = np.nan
    frame.loc[2, "iwae_samples"] = None  # `evaluate` logs K with the metrics
    points = pd.DataFrame([(run_id, 1, 300.0) for run_id in frame["run_id"]], columns=["run_id", "step", "value"])
    summary, diffs, left = compare.write_report(frame, points, tmp_path)
    assert left[["run", "run_id", "reason"]].values.tolist() == [["run-2", "id2", "not evaluated (no test metrics)"]]
    assert summary["n"].tolist() == [2] and summary["latent_dim"].tolist() == ["2"] and diffs.empty
    text = compare.console(summary, diffs, left, tmp_path)
    assert text.startswith("2 runs compared (1 groups")
    assert [line for line in text.splitlines() if "run-2" in line] == ["- run-2 (id2): not evaluated (no test metrics)"]
    with pytest.raises(StageError, match="none of the 1 finished training runs has test metrics"):
        compare.write_report(frame.loc[[2]], points, tmp_path)


def test_curves_average_each_groups_seeds_step_by_step():
    frame = _runs(({}, [1.0, 1.0, 1.0]), ({"latent_dim": "8"}, [1.0]))
    points = pd.DataFrame([("id0", 1, 300.0), ("id1", 1, 330.0), ("id2", 1, 360.0), ("id3", 1, 280.0),
                           ("id0", 2, 200.0), ("id1", 2, 210.0), ("id2", 2, 250.0)],
                          columns=["run_id", "step", "value"])
    bands = compare.curves(frame, points).set_index(["group", "step"])
    assert bands.loc[("g1", 1)].to_dict() == {"mean": 330.0, "min": 300.0, "max": 360.0, "n": 3}
    assert bands.loc[("g1", 2), "mean"] == pytest.approx(220.0)
    assert bands.loc[("g2", 1)].to_dict() == {"mean": 280.0, "min": 280.0, "max": 280.0, "n": 1}


def test_the_report_writes_its_tables_and_figures_without_mlflow(tmp_path):
    frame = _runs(({}, [150.0, 151.0, 149.0]), ({"latent_dim": "8"}, [110.0, 112.0, 111.0]),
                  ({"optimizer": "rmsprop"}, [149.0, 152.0]), ({"latent_dim": "16", "optimizer": "rmsprop"}, [100.0]))
    points = pd.DataFrame([(run_id, step, 400.0 / step + 40 * i) for i, run_id in enumerate(frame["run_id"])
                           for step in (1, 2, 3)], columns=["run_id", "step", "value"])
    summary, diffs, left = compare.write_report(frame, points, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"runs.csv", "runs.md", "groups.csv", "groups.md", "differences.md",
                                                    "differences.csv", "metrics_vs_latent_dim.png",
                                                    "learning_curves.png"}
    metrics = [m for m in compare.FINAL_METRICS if f"{m}_mean" in summary]
    with Image.open(tmp_path / "metrics_vs_latent_dim.png") as image:  # a panel per metric, three to a row, 80 dpi
        assert image.size == (14 * 80, round((4 * -(-len(metrics) // 3) + 0.5) * 80))
    with Image.open(tmp_path / "learning_curves.png") as image:  # a curve per group, each in its own colour
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        for colour in plt.rcParams["axes.prop_cycle"].by_key()["color"][:len(summary)]:
            rgb = np.round(np.array(to_rgb(colour)) * 255)
            assert (pixels == rgb).all(axis=1).sum() > 50, colour
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 9
    groups = pd.read_csv(tmp_path / "groups.csv")
    assert list(groups["n"]) == [3, 2, 3, 1] and {"test_neg_elbo_ci95_low", "test_mse_per_pixel_std"} <= set(groups)
    assert list(pd.read_csv(tmp_path / "differences.csv").columns) == compare.DIFFERENCE_COLUMNS
    text = compare.console(summary, diffs, left, Path("reports/compare"))
    assert text.startswith("9 runs compared (4 groups") and "differs beyond seed noise" in text
    assert left.empty and "left out" not in text
    for lines in (text.splitlines(), *((tmp_path / name).read_text().splitlines() for name in ("groups.md",
                                                                                             "differences.md"))):
        assert max(map(len, lines)) <= 120


def test_runs_logged_under_the_sectioned_names_and_under_the_keys_before_them_read_alike(tmp_path, monkeypatch):
    """Since MLflow's run page sections charts by name prefix, runs log `test/neg_elbo` and
    `learning_curve/val_neg_elbo`; a run logged before that has `test_neg_elbo` and `val_neg_elbo`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow
    ids = []
    for names, value in (({"test": "test_neg_elbo", "curve": "val_neg_elbo"}, 100.0),
                         ({"test": "test/neg_elbo", "curve": "learning_curve/val_neg_elbo"}, 90.0)):
        with mlflow.start_run() as run:
            mlflow.log_params({**SETTING, "seed": "0"})
            mlflow.log_metric(names["test"], value, step=0)
            for epoch in (1, 2):
                mlflow.log_metric(names["curve"], value + 10 / epoch, step=epoch)
        ids.append(run.info.run_id)
    frame = compare.table(mlflow.search_runs(experiment_names=["Default"]))
    assert sorted(frame["test_neg_elbo"]) == [90.0, 100.0]
    points = compare.histories(ids)
    assert sorted(points["value"]) == [95.0, 100.0, 105.0, 110.0] and set(points["run_id"]) == set(ids)


def test_manifolds_show_each_runs_figure_from_mlflow_and_say_so_where_a_run_has_none(tmp_path, monkeypatch):
    """Three runs in a real local store: latent 2 and 8 logged a manifold (all red; all mid-grey, greyscale as the
    render stage draws them), latent 16 was never rendered. manifolds.png shows them in the order of their groups,
    each in its own colours, the third panel empty but for its message."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow
    from mlflow.exceptions import MlflowException
    experiment = mlflow.create_experiment("manifolds", artifact_location=(tmp_path / "artifacts").as_uri())
    red, grey = (255, 0, 0), (128, 128, 128)
    for latent_dim, colour in (("16", None), ("8", grey), ("2", red)):
        with mlflow.start_run(experiment_id=experiment, run_name=f"latent-{latent_dim}") as run:
            mlflow.log_params({**SETTING, "latent_dim": latent_dim, "seed": "0"})
            mlflow.set_tag("iwae_samples", "500")
            mlflow.log_metric("test/neg_elbo", 100.0)
            if colour:
                (tmp_path / latent_dim).mkdir()
                Image.new("RGB" if colour == red else "L", (60, 60), colour[0] if colour == grey else colour).save(
                    tmp_path / latent_dim / "manifold.png")
                mlflow.log_artifact(str(tmp_path / latent_dim / "manifold.png"), "figures")
            else:
                unrendered = run.info.run_id
    with pytest.raises(MlflowException, match="Failed to download artifacts from path 'manifold.png'") as error:
        mlflow.artifacts.download_artifacts(run_id=unrendered, artifact_path="figures/manifold.png",
                                            dst_path=str(tmp_path / "download"))  # what `manifolds` has to expect
    assert error.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    frame = compare.table(mlflow.search_runs(experiment_ids=[experiment]))
    assert frame["iwae_samples"].tolist() == ["500"] * 3 and frame["finished"].notna().all()

    missing = compare.manifolds(frame, tmp_path / "manifolds.png")
    assert missing.values.tolist() == [["latent-16", unrendered]]
    image = np.asarray(Image.open(tmp_path / "manifolds.png").convert("RGB")).astype(int)
    height, width, _ = image.shape
    assert width > 2.5 * height  # one row of three panels
    panels = [image[:, i * width // 3:(i + 1) * width // 3] for i in range(3)]

    def share(panel: np.ndarray, colour: tuple[int, int, int]) -> float:
        return float((np.abs(panel - colour).max(axis=2) < 40).mean())

    assert share(panels[0], red) > 0.3 and share(panels[0], grey) < 0.05  # latent 2: g1
    assert share(panels[1], grey) > 0.3 and share(panels[1], red) == 0  # latent 8: g2, grey (not a colour map's)
    middle = panels[2][height // 3 : 2 * height // 3]  # latent 16: below its title, the message and nothing else
    assert share(panels[2], red) == 0 and share(panels[2], grey) < 0.05
    assert 0.005 < float((middle.max(axis=2) < 160).mean()) < 0.2 and share(middle, (255, 255, 255)) > 0.8
