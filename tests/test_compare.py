"""`vaelab compare`'s statistics on hand-made runs tables shaped like `compare.table` (parameters as the strings
MLflow returns, final metrics as floats): groups of seeds, their n, mean, std and interval, and Welch's test
between settings that differ in one parameter. No MLflow: the figures get their histories as data."""
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vaelab import compare

SETTING = {"latent_dim": "2", "dropout": "0.3", "optimizer": "adam", "lr": "0.0001", "lr_schedule": "constant",
           "beta": "1.0", "kl_warmup_epochs": "0", "batch_size": "500", "epochs": "3", "binarize": "none"}


def _runs(*settings: tuple[dict, list[float]]) -> pd.DataFrame:
    """One run per value: each (changes to SETTING, test_neg_elbo of its seeds 0, 1, ...); other metrics derived."""
    rows = []
    for changes, values in settings:
        for seed, value in enumerate(values):
            i = len(rows)
            rows.append({"run": f"run-{i}", "run_id": f"id{i}", **SETTING, **changes, "seed": str(seed),
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
    section = compare.groups_markdown(compare.summarize(frame)).split("## test_neg_elbo")[1].split("##")[0]
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
    points = pd.DataFrame([(run_id, step, 400.0 / step) for run_id in frame["run_id"] for step in (1, 2, 3)],
                          columns=["run_id", "step", "value"])
    summary, diffs = compare.write_report(frame, points, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"runs.csv", "runs.md", "groups.csv", "groups.md", "differences.md",
                                                    "differences.csv", "metrics_vs_latent_dim.png",
                                                    "learning_curves.png"}
    for png in ("metrics_vs_latent_dim.png", "learning_curves.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 9
    groups = pd.read_csv(tmp_path / "groups.csv")
    assert list(groups["n"]) == [3, 2, 3, 1] and {"test_neg_elbo_ci95_low", "test_mse_per_pixel_std"} <= set(groups)
    assert list(pd.read_csv(tmp_path / "differences.csv").columns) == compare.DIFFERENCE_COLUMNS
    text = compare.console(summary, diffs, tmp_path)
    assert text.startswith("9 runs compared (4 groups") and "differs beyond seed noise" in text
    for name in ("groups.md", "differences.md"):
        assert max(map(len, (tmp_path / name).read_text().splitlines())) <= 120


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
