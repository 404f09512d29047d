"""The comparison report: every training run of an experiment, side by side.

    vaelab compare [--experiment vaelab] [--tag dvc.exp_baseline_rev=<rev>] [--out reports/compare]

Reads the runs from MLflow into pandas (`mlflow.search_runs`) and writes a table of parameters and final
metrics (Markdown and CSV), each final test metric against `latent_dim` with one line per optimizer and
dropout, the validation learning curves overlaid, and the final manifolds side by side. The same files are
logged to MLflow in a run of their own (tagged `vaelab.kind = comparison`).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from vaelab import tracking  # noqa: E402
from vaelab.stages import StageError  # noqa: E402

PARAMS = ["latent_dim", "dropout", "optimizer", "lr", "lr_schedule", "beta", "kl_warmup_epochs", "batch_size",
          "epochs", "seed", "binarize"]
FINAL_METRICS = ["test_neg_elbo", "test_iwae_nll", "test_elbo_gap", "test_active_units",
                 "test_latent_classifier_accuracy", "test_mse_per_pixel"]
KIND_TAG = "vaelab.kind"


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
    """Run name and id, the parameters, and the final test metrics present in any run."""
    columns = {"tags.mlflow.runName": "run", "run_id": "run_id"}
    columns |= {f"params.{p}": p for p in PARAMS if f"params.{p}" in runs}
    columns |= {f"metrics.{m}": m for m in FINAL_METRICS if f"metrics.{m}" in runs}
    out = runs[list(columns)].rename(columns=columns)
    if "latent_dim" in out:
        out["latent_dim"] = out["latent_dim"].astype(int)
    return out


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rows = ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, "|" + " --- |" * len(frame.columns), *rows]) + "\n"


def metrics_against_latent_dim(frame: pd.DataFrame, path: Path) -> Path:
    metrics = [m for m in FINAL_METRICS if m in frame]
    rows = -(-len(metrics) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 4 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        for (optimizer, dropout), group in frame.groupby(["optimizer", "dropout"]):
            group = group.sort_values("latent_dim")
            ax.plot(group["latent_dim"], group[metric], marker="o", label=f"{optimizer}, dropout {dropout}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latent_dim")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def learning_curves(frame: pd.DataFrame, path: Path, metric: str = "val_neg_elbo") -> Path:
    client = mlflow.tracking.MlflowClient()
    fig, ax = plt.subplots(figsize=(9, 5))
    for row in frame.itertuples(index=False):
        history = sorted(client.get_metric_history(row.run_id, metric), key=lambda m: m.step)
        label = f"{row.run}: z={row.latent_dim}, {row.optimizer}, dropout {row.dropout}"
        ax.plot([m.step for m in history], [m.value for m in history], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (nats per image)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def manifolds(frame: pd.DataFrame, path: Path) -> Path:
    """Each run's final manifold (its logged figures/manifold.png), side by side, titled by its settings."""
    columns = min(4, len(frame))
    rows = -(-len(frame) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.3 * rows), squeeze=False)
    with tempfile.TemporaryDirectory() as scratch:
        for ax, row in zip(axes.flat, frame.itertuples(index=False)):
            image = mlflow.artifacts.download_artifacts(run_id=row.run_id, artifact_path="figures/manifold.png",
                                                        dst_path=os.path.join(scratch, row.run_id))
            ax.imshow(Image.open(image))
            ax.set_title(f"{row.run}\nz={row.latent_dim}, {row.optimizer}, dropout {row.dropout}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def compare(experiment: str, tags: dict[str, str], out: Path, log: bool = True) -> pd.DataFrame:
    tracking.check_reachable()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = training_runs(experiment, tags)
    if runs.empty:
        raise StageError(f"no finished training runs in experiment {experiment!r}"
                         + (f" with tags {tags}" if tags else ""))
    frame = table(runs)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    (out / "runs.md").write_text(_markdown(frame))
    metrics_against_latent_dim(frame, out / "metrics_vs_latent_dim.png")
    learning_curves(frame, out / "learning_curves.png")
    manifolds(frame, out / "manifolds.png")
    if log:
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        with tracking.store_lock(), mlflow.start_run(experiment_id=experiment_id, run_name="comparison",
                                                     tags={KIND_TAG: "comparison", **tags}):
            mlflow.log_artifacts(str(out), "compare")
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vaelab compare", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.EXPERIMENT_NAME))
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag, e.g. dvc.exp_baseline_rev=<commit>; repeatable")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = parser.parse_args(argv)
    bad = [t for t in args.tag if "=" not in t]
    if bad:
        parser.error(f"--tag takes KEY=VALUE, got {bad[0]!r}")
    frame = compare(args.experiment, dict(t.split("=", 1) for t in args.tag), args.out, log=not args.no_log)
    print(f"{len(frame)} runs compared -> {args.out}/")
    print(_markdown(frame))
