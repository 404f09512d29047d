"""`vaelab compare`'s figures drawn from its tables: each final metric against latent_dim, and the learning curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def label(record: dict, params: list[str]) -> str:
    """`record`'s values of `params`, as p=v, ...: a group's or a run's label."""
    return ", ".join(f"{p}={record[p]}" for p in params)


def metrics_against_latent_dim(summary: pd.DataFrame, metrics: list[str], others: list[str], path: Path) -> Path:
    """Each group's mean of each of `metrics` against latent_dim with its 95% interval, one line per combination of
    `others`, the other parameters that vary; a group of one run is a point without an error bar."""
    rows = -(-len(metrics) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 4 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    lines = list(summary.groupby(others, sort=False)) if others else [((), summary)]
    for ax, metric in zip(axes.flat, metrics):
        for key, line in lines:
            # a run without latent_dim has no place on this axis
            line = line.assign(x=pd.to_numeric(line["latent_dim"], errors="coerce")).sort_values("x")
            mean = line[f"{metric}_mean"]
            ax.errorbar(line["x"], mean, yerr=line[f"{metric}_ci95_high"] - mean, marker="o", capsize=3,
                        label=label(dict(zip(others, key)), others) or None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latent_dim")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if others:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("mean over seeds; error bars: 95% confidence interval of the mean (Student t), none where n = 1")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def learning_curves(bands: pd.DataFrame, summary: pd.DataFrame, varying: list[str], path: Path, metric: str) -> Path:
    """Each group's learning curve of `metric` (`compare.curves`): the mean over its seeds, shaded from their min to
    their max; a plain line for a group of one run; labelled by the `varying` parameters."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for record in summary.to_dict("records"):
        band = bands[bands["group"] == record["group"]]
        if band.empty:
            continue
        described = label(record, varying)
        [line] = ax.plot(band["step"], band["mean"],
                         label=f"{record['group']} (n={record['n']})" + (f": {described}" if described else ""))
        if band["n"].max() > 1:
            ax.fill_between(band["step"], band["min"], band["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (nats per image)")
    ax.set_yscale("log")
    ax.set_title(f"{metric}: mean over seeds; band: min to max over seeds (none for a group of one run)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
