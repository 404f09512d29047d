"""The comparison report: every training run of an experiment, with seeds as the measure of noise.

    vaelab compare [--experiment vaelab] [--tag dvc.exp_baseline_rev=<rev>] [--out reports/compare]

Reads the runs from MLflow into pandas (`mlflow.search_runs`) and writes a table of parameters and final
metrics per run (runs.md, runs.csv); the runs grouped by setting (parameters and the evaluation's K), where a
group's runs differ only in seed, with n, mean, standard deviation and 95% confidence interval of each final metric
(groups.md, groups.csv); for every two groups that differ in one parameter, Welch's t-test of each metric, judged by
its Benjamini-Hochberg q (differences.md, differences.csv); figures (`compare_figures`). A run never evaluated, and
all but the latest run of a setting and seed, are left out and named. The files are logged to MLflow in a run of
their own (tagged `vaelab.kind = comparison`). The statistics are pure functions of the runs table (`left_out`,
`summarize`, `differences`, `curves`); MLflow is read and figures drawn around them.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats

from vaelab import access, store
from vaelab.compare_figures import (difference_tables, label, learning_curves, left_out_markdown, manifold_panels,
                                    markdown_table, metrics_against_latent_dim, prose)
from vaelab.config import EVALUATION_ONLY, Params
from vaelab.stages import StageError
from vaelab.tracking import metric_name

# The settings that shape a trained model, from the one schema; where it trained (`device`) is not a setting
PARAMS = [name for name in Params().training_dict() if name != "device"]
# How it was evaluated is part of a run's setting too (K of test_iwae_nll: a bound at K = 20 is not one at 5000);
# `evaluate` logs these as tags, since a re-evaluation may change them and MLflow params cannot change
SETTINGS = PARAMS + list(EVALUATION_ONLY)
# Settings added later whose default is what every run before them trained: a run that lacks one had its default
DEFAULT_WHEN_ABSENT = ("conditional", "architecture", "objective", "train_samples", "output_bias")
# test_iwae_nll_given_label: conditional runs only; their test_neg_elbo, test_kl and gap are given the label too
FINAL_METRICS = ["test_neg_elbo", "test_iwae_nll", "test_iwae_nll_given_label", "test_kl", "test_elbo_gap",
                 "test_active_units", "test_latent_classifier_accuracy", "test_mse_per_pixel"]
# What a conditional and an unconditional run measure alike (docs/conditional.md). test_iwae_nll bounds -log p(x)
# in both (the conditional's over the ten labels). Active units and the latent classifier describe the encoder's
# means the same way in both; that the conditional's z need not carry the digit is the difference they measure.
# The rest of a conditional run's numbers are given the true label, which an unconditional run does not have: the
# ELBO, its KL and gap, -log p(x|y), and the per-pixel MSE, whose reconstruction is decoded from z and the label.
COMPARABLE_ACROSS_CONDITIONAL = ("test_iwae_nll", "test_active_units", "test_latent_classifier_accuracy")
CURVE_METRIC = "val_neg_elbo"
KIND_TAG = "vaelab.kind"
SEED = "seed"
MISSING = "(missing)"  # the value of a parameter a run did not log: a setting of its own
ALPHA = 0.05
TEST = "Welch's t-test"
BEYOND, WITHIN, TOO_FEW = "differs beyond seed noise", "within seed noise", "n too small"
NOT_COMPARABLE = "not comparable"
NOT_EVALUATED, SUPERSEDED = "not evaluated (no test metrics)", "a later run of its setting and seed counts"
STATS = ["n", "mean", "std", "ci95_low", "ci95_high"]
DIFFERENCE_COLUMNS = ["metric", "parameter", "value_a", "value_b", "group_a", "group_b", "n_a", "n_b", "mean_a",
                      "mean_b", "difference", "t", "p_value", "q_value", "test", "verdict"]
LEFT_OUT_COLUMNS = ["run", "run_id", "reason", "group", SEED, "counted"]


def training_runs(experiment: str, tags: dict[str, str]) -> pd.DataFrame:
    """Finished training runs (not comparison runs) with the given tags, one row each, oldest first."""
    filters = ["attributes.status = 'FINISHED'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=" and ".join(filters),
                              order_by=["attributes.start_time ASC"])
    if runs.empty:
        return runs
    kind = runs.get(f"tags.{KIND_TAG}", pd.Series(None, index=runs.index, dtype=object))
    return runs[kind.ne("comparison")].reset_index(drop=True)


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """Run name and id, when it finished (its end, or its start where it has none), the settings (strings, as MLflow
    keeps them: the parameters, and the evaluation's tags), and the final test metrics present in any run, each
    under its key whether the run logged it under its sectioned name (`tracking.metric_name`) or, before those,
    under the key itself."""
    columns = {"tags.mlflow.runName": "run", "run_id": "run_id"}
    columns |= {f"params.{p}": p for p in PARAMS if f"params.{p}" in runs}
    columns |= {f"tags.{p}": p for p in EVALUATION_ONLY if f"tags.{p}" in runs}
    frame = runs[list(columns)].rename(columns=columns)
    frame.insert(2, "finished", runs["end_time"].fillna(runs["start_time"]))
    for key in FINAL_METRICS:
        logged = [runs[column] for column in (f"metrics.{metric_name(key)}", f"metrics.{key}") if column in runs]
        if logged:
            frame[key] = logged[0] if len(logged) == 1 else logged[0].combine_first(logged[1])
    for name in DEFAULT_WHEN_ABSENT:
        if name in frame:
            frame[name] = frame[name].fillna(str(getattr(Params(), name)))
    return frame


def histories(run_ids: list[str], metric: str = CURVE_METRIC) -> pd.DataFrame:
    """Every logged point of `metric` for these runs, from MLflow (under its sectioned name, or for a run logged
    before those, under the key): columns run_id, step, value."""
    client = mlflow.tracking.MlflowClient()
    points = [(run_id, m.step, m.value) for run_id in run_ids for m in
              client.get_metric_history(run_id, metric_name(metric)) or client.get_metric_history(run_id, metric)]
    return pd.DataFrame(points, columns=["run_id", "step", "value"])


# --- statistics: pure functions of the runs table ---

def _canonical(value: object) -> str:
    """A parameter value as one string per setting: MLflow hands back "0.3" and "2", a hand-made frame 0.3 and
    2.0, and these must land in the same group; a value a run lacks is MISSING, never merged with another."""
    if pd.isna(value):
        return MISSING
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _order(value: str) -> tuple:
    """Sort key of a canonical value: numbers by size (2 before 16), then words, then MISSING."""
    if value == MISSING:
        return 2, 0.0, ""
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value


def _params(frame: pd.DataFrame) -> list[str]:
    """The parameters in `frame` that define a setting: all but the seed."""
    return [p for p in SETTINGS if p != SEED and p in frame]


def _metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in FINAL_METRICS if m in frame]


def _summarized_metrics(summary: pd.DataFrame) -> list[str]:
    """The final metrics a summary (`summarize`) has columns for."""
    return [m for m in FINAL_METRICS if f"{m}_mean" in summary]


def _varying(frame: pd.DataFrame) -> list[str]:
    """The setting parameters that take more than one value in `frame`: the ones worth a column or a label."""
    return [p for p in _params(frame) if frame[p].nunique() > 1]


def settings(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's group, seed and setting parameters (canonical strings), indexed like `frame`.

    Runs of one group differ only in seed, so the spread within a group is the seed noise and nothing else. Groups
    are named g1, g2, ... in the order of their settings (an ordered categorical, so sorting follows it)."""
    params = _params(frame)
    values = frame.reindex(columns=[SEED, *params]).map(_canonical)
    keys = list(values[params].itertuples(index=False, name=None))
    names = {key: f"g{i}" for i, key in enumerate(sorted(set(keys), key=lambda k: [_order(v) for v in k]), 1)}
    group = pd.Categorical([names[key] for key in keys], categories=list(names.values()), ordered=True)
    return values.assign(group=pd.Series(group, index=frame.index))[["group", SEED, *params]]


def left_out(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs the statistics leave out, and why (LEFT_OUT_COLUMNS): a run without test metrics (trained, never
    evaluated) has nothing to compare; of several runs of one setting and seed (a re-run, another commit, a CPU and
    a GPU run) only the latest finished counts, named beside the others: a seed counted twice would narrow the
    interval with no new evidence. Groups as `settings` names them among the evaluated runs, the counted ones'."""
    evaluated = frame[_metrics(frame)].notna().any(axis=1)
    runs = settings(frame[evaluated]).join(frame[["run", "run_id"]])
    # latest first; of two that finished together, the one started later (the frame is oldest first)
    latest = runs.loc[frame.loc[evaluated, "finished"][::-1].sort_values(ascending=False, kind="stable").index]
    kept = latest.drop_duplicates(["group", SEED])
    counted = kept.assign(counted=kept["run"] + " (" + kept["run_id"] + ")")[["group", SEED, "counted"]]
    superseded = runs.drop(kept.index).merge(counted, on=["group", SEED], how="left").assign(reason=SUPERSEDED)
    unevaluated = frame.loc[~evaluated, ["run", "run_id"]].assign(reason=NOT_EVALUATED, group="", seed="", counted="")
    return pd.concat([unevaluated, superseded], ignore_index=True)[LEFT_OUT_COLUMNS]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group: its parameters, n runs, their seeds and names, and per final metric the n runs that have
    it, their mean, sample standard deviation (ddof=1) and the 95% confidence interval of the mean (Student t
    with n - 1 degrees of freedom: right for the handful of seeds one can afford, where a normal interval is too
    narrow). A group of one run has no std and no interval (NaN): one run says nothing about the noise, and 0
    would say there is none."""
    runs = settings(frame)
    by_group = runs.assign(run=frame["run"].astype(str)).groupby("group", observed=True)
    out = runs.drop_duplicates("group").drop(columns=SEED).set_index("group").sort_index()
    out["n"] = by_group.size()
    out["seeds"] = by_group[SEED].agg(lambda seeds: " ".join(sorted(seeds, key=_order)))
    out["runs"] = by_group["run"].agg(" ".join)
    for metric in _metrics(frame):
        values = frame[metric].groupby(runs["group"], observed=True)
        n, mean, std = values.count(), values.mean(), values.std(ddof=1)
        half = stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)  # t.ppf(., 0) is NaN: no interval from one run
        for name, column in zip(STATS, (n, mean, std, mean - half, mean + half)):
            out[f"{metric}_{name}"] = column
    return out.reset_index()


def benjamini_hochberg(p_values: pd.Series) -> pd.Series:
    """Each p-value's Benjamini-Hochberg q over all the p-values given (NaN, no test, stays NaN and is not counted):
    calling "differs" every test with q <= alpha keeps the expected share of false calls among them at alpha, however
    many metrics and settings a report tests, where p <= alpha alone calls 1 in 20 of the true nulls."""
    tested = p_values.dropna()
    return pd.Series(stats.false_discovery_control(tested.to_numpy(float)), index=tested.index).reindex(p_values.index)


def differences(frame: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """For every two groups whose settings differ in exactly one parameter (the only pairs whose difference can be
    put down to that parameter) and every final metric: Welch's two-sided t-test of the two groups' values, which
    does not assume a setting leaves the seed noise unchanged, and its q (`benjamini_hochberg`, over every test of
    the table), which the verdict follows. The difference and t are b - a, where a is the group first in order (the
    smaller number). Either group under 2 runs: no test, verdict "n too small"; a pair that differs in
    `conditional`, on a metric not in COMPARABLE_ACROSS_CONDITIONAL: no test, "not comparable"."""
    runs = settings(frame)
    params = _params(frame)
    head = runs.drop_duplicates("group").set_index("group").sort_index()
    pairs = []
    for a, b in itertools.combinations(head.index, 2):
        changed = [p for p in params if head.at[a, p] != head.at[b, p]]
        if len(changed) == 1:
            pairs.append((changed[0], a, b))
    pairs.sort(key=lambda pair: params.index(pair[0]))  # stable: groups in order within a parameter
    rows = []
    for metric in _metrics(frame):
        for param, a, b in pairs:
            x, y = (frame.loc[runs["group"] == g, metric].dropna() for g in (a, b))
            if min(len(x), len(y)) == 0:  # a metric one kind of run has not (test_iwae_nll_given_label)
                continue
            unlike = param == "conditional" and metric not in COMPARABLE_ACROSS_CONDITIONAL
            verdict = NOT_COMPARABLE if unlike else TOO_FEW if min(len(x), len(y)) < 2 else None  # None: by q below
            t = p = np.nan
            if verdict is None:
                with warnings.catch_warnings():  # identical values (active units) warn; scipy's nan or inf is right
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t, p = (float(v) for v in stats.ttest_ind(y, x, equal_var=False))
            rows.append([metric, param, head.at[a, param], head.at[b, param], a, b, len(x), len(y), x.mean(),
                         y.mean(), np.nan if unlike else y.mean() - x.mean(), t, p, np.nan, "" if unlike else TEST,
                         verdict])
    diffs = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    diffs["q_value"] = benjamini_hochberg(diffs["p_value"])
    # q is nan where both groups are constant and equal (active units; p nan): no difference at all
    tested = diffs["verdict"].isna()
    diffs.loc[tested, "verdict"] = np.where(diffs.loc[tested, "q_value"] <= alpha, BEYOND, WITHIN)
    return diffs


def curves(frame: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Per group and step, the mean of a logged metric over the group's seeds with its min, max and n: the
    learning curve of a setting and how far its seeds stray. `points` is `histories` (run_id, step, value);
    points of runs not in `frame` are left out."""
    group = settings(frame)["group"].set_axis(frame["run_id"])
    grouped = points.assign(group=points["run_id"].map(group)).groupby(["group", "step"], observed=True)["value"]
    return grouped.agg(["mean", "min", "max", "count"]).rename(columns={"count": "n"}).reset_index()


# --- Markdown and console ---

def _overview(summary: pd.DataFrame) -> str:
    """The groups by the parameters that vary between them, with their n and seeds."""
    return markdown_table(summary[["group", *_varying(summary), "n", "seeds"]])


def groups_markdown(summary: pd.DataFrame, left: pd.DataFrame) -> str:
    varying = _varying(summary)
    same = ", ".join(f"{p}={summary.at[0, p]}" for p in _params(summary) if p not in varying)
    text = "# Groups of runs that differ only in seed\n\n" + prose(
        f"{summary['n'].sum()} runs in {len(summary)} groups" + (f", {len(left)} left out (below)" if len(left) else "")
        + "." + (f" The same in every group: {same}." if same else ""),
        "Per group and final metric: n runs with the metric, their mean, the sample standard deviation (std, "
        "ddof=1) and the 95% confidence interval of the mean (Student t); no std or interval where n = 1.")
    text += "\n" + _overview(summary) + left_out_markdown(left)
    for metric in _summarized_metrics(summary):
        columns = {"group": "group", **{p: p for p in varying}} | {f"{metric}_{s}": s.replace("_", " ") for s in STATS}
        text += f"\n## {metric}\n\n" + markdown_table(summary[list(columns)].rename(columns=columns))
    return text


def _verdicts(diffs: pd.DataFrame) -> str:
    counts = diffs["verdict"].value_counts()
    unlike = f", {counts[NOT_COMPARABLE]} are not comparable" if NOT_COMPARABLE in counts else ""
    return (f"{counts.get(BEYOND, 0)} of {len(diffs)} comparisons differ beyond seed noise, {counts.get(WITHIN, 0)}"
            f" are within it, {counts.get(TOO_FEW, 0)} have n too small (a group of fewer than 2 runs){unlike}. Each "
            f"verdict follows the test's Benjamini-Hochberg q over all {diffs['p_value'].notna().sum()} tests of this "
            f"report (every metric and pair), at {ALPHA}: among the differences called beyond seed noise, the "
            f"expected share of false ones is at most {ALPHA:.0%}, however many metrics and settings are tested.")


def differences_markdown(diffs: pd.DataFrame, summary: pd.DataFrame) -> str:
    text = "# Differences between settings, against the seed noise\n\n" + prose(
        "Every two groups whose settings differ in exactly one parameter, per final metric: "
        f"{TEST} (two-sided, unequal variances) of the seeds' values. b - a is the difference of the means, p its "
        f"p-value and q its Benjamini-Hochberg q-value over all the tests below; beyond seed noise where q <= {ALPHA}."
        " \"n too small\": a group has fewer than 2 runs with the metric. \"not comparable\": the groups differ in "
        "`conditional` and a conditional run's value is given the label; only "
        f"{', '.join(COMPARABLE_ACROSS_CONDITIONAL)} mean the same for both. The groups (as in groups.md):")
    return text + "\n" + _overview(summary) + "\n" + prose(_verdicts(diffs)) + difference_tables(diffs)


def console(summary: pd.DataFrame, diffs: pd.DataFrame, left: pd.DataFrame, out: Path) -> str:
    """What `vaelab compare` prints: the groups and the runs left out, then the differences beyond the seed noise."""
    beyond = diffs[diffs["verdict"] == BEYOND]
    return (f"{summary['n'].sum()} runs compared ({len(summary)} groups of runs that differ only in seed) -> {out}/\n\n"
            + groups_markdown(summary, left)
            + f"\n# Beyond seed noise ({TEST}, two-sided, Benjamini-Hochberg q <= {ALPHA})\n\n"
            + prose(_verdicts(diffs) + f" All comparisons: {out / 'differences.md'}.") + difference_tables(beyond))


def manifolds(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Each run's final manifold (`manifold_panels`): its figures/manifold.png, a conditional run's
    manifold_per_digit.png, the seeds of a setting side by side, titled by run, seed and settings. Returns the runs
    that have none (run, run_id)."""
    runs = settings(frame).sort_values("group", kind="stable").join(frame[["run", "run_id"]])
    varying = _varying(runs)
    figure = {False: "figures/manifold.png", True: "figures/manifold_per_digit.png"}
    missing = manifold_panels([(f"{run['run']}, seed {run[SEED]}\n{label(run, varying)}", run["run_id"],
                                figure[run.get("conditional") == "True"]) for run in runs.to_dict("records")], path)
    return runs.iloc[missing][["run", "run_id"]]


def write_report(frame: pd.DataFrame, points: pd.DataFrame,
                 out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The tables and the two figures that need no MLflow (all but the manifolds), of the runs not `left_out`;
    returns (summary, diffs, left out). runs.csv and runs.md list every run, with why one is left out."""
    left = left_out(frame)
    counted = frame[~frame["run_id"].isin(left["run_id"])]
    if counted.empty:
        raise StageError(f"none of the {len(frame)} finished training runs has test metrics: they were trained, "
                         "never evaluated (dvc repro evaluate)")
    summary, diffs = summarize(counted), differences(counted)
    out.mkdir(parents=True, exist_ok=True)
    runs = frame.assign(left_out=frame["run_id"].map(left.set_index("run_id")["reason"]))
    runs.to_csv(out / "runs.csv", index=False)
    (out / "runs.md").write_text(markdown_table(runs))
    summary.to_csv(out / "groups.csv", index=False)
    (out / "groups.md").write_text(groups_markdown(summary, left))
    diffs.to_csv(out / "differences.csv", index=False)
    (out / "differences.md").write_text(differences_markdown(diffs, summary))
    others = [p for p in _varying(summary) if p != "latent_dim"]
    metrics_against_latent_dim(summary, _summarized_metrics(summary), others, out / "metrics_vs_latent_dim.png")
    learning_curves(curves(counted, points), summary, _varying(summary), out / "learning_curves.png", CURVE_METRIC)
    return summary, diffs, left


def compare(experiment: str, tags: dict[str, str], out: Path,
            log: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read the runs from MLflow, write the report into `out` and (unless not `log`) log it; returns
    (summary, diffs, left out)."""
    access.check_access(write=False, experiment=experiment)
    mlflow.set_tracking_uri(store.tracking_uri())
    runs = training_runs(experiment, tags)
    if runs.empty:
        raise StageError(f"no finished training runs in experiment {experiment!r}"
                         + (f" with tags {tags}" if tags else ""))
    frame = table(runs)
    summary, diffs, left = write_report(frame, histories(list(frame["run_id"])), out)
    for run, run_id in manifolds(frame[~frame["run_id"].isin(left["run_id"])], out / "manifolds.png").values:
        print(f"no manifold figure in MLflow for {run} ({run_id}), never rendered: its panel in manifolds.png is "
              "empty", file=sys.stderr)
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    if log and (refusal := access.write_refusal(experiment_id, experiment)):  # a reader: the report, no run
        print(f"the comparison run was not logged: {refusal}", file=sys.stderr)
    elif log:
        with store.store_lock(), mlflow.start_run(experiment_id=experiment_id, run_name="comparison",
                                                     tags={KIND_TAG: "comparison", **tags}):
            mlflow.log_artifacts(str(out), "compare")
            for figure in sorted(out.glob("*.png")):  # as images too, so that they show on the run's page
                with Image.open(figure) as image:
                    mlflow.log_image(image.copy(), key=f"compare/{figure.stem}")
    return summary, diffs, left


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vaelab compare", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", store.EXPERIMENT_NAME))
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag, e.g. dvc.exp_baseline_rev=<commit>; repeatable")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = parser.parse_args(argv)
    bad = [t for t in args.tag if "=" not in t]
    if bad:
        parser.error(f"--tag takes KEY=VALUE, got {bad[0]!r}")
    report = compare(args.experiment, dict(t.split("=", 1) for t in args.tag), args.out, log=not args.no_log)
    print(console(*report, args.out), end="")
