"""How `vaelab compare` shows its tables: the figures (each final metric against latent_dim, the learning curves,
the manifolds MLflow holds) and the Markdown that reads in a terminal as well as rendered."""
from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode  # noqa: E402
from PIL import Image  # noqa: E402

WIDTH = 110  # the prose of the Markdown reports, for a terminal of 100-120 columns


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


def _logged_file(run_id: str, artifact_path: str, scratch: str) -> str | None:
    """A local copy of one of a run's artifacts, or None where the run has none: MLflow 3.17's runs:/ repository
    then raises RESOURCE_DOES_NOT_EXIST ("Failed to download artifacts from path ..."); other errors go up."""
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                   dst_path=os.path.join(scratch, run_id))
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None


def manifold_panels(panels: list[tuple[str, str, str]], path: Path) -> list[int]:
    """Figures MLflow holds side by side, four to a row, one per (title, run id, artifact path); a run that has none
    (never rendered) gets a panel saying so, not a traceback. Returns the positions of those panels."""
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.3 * rows), squeeze=False)
    missing = []
    with tempfile.TemporaryDirectory() as scratch:
        for position, (ax, (title, run_id, artifact_path)) in enumerate(zip(axes.flat, panels)):
            image = _logged_file(run_id, artifact_path, scratch)
            if image is None:
                missing.append(position)
                ax.text(0.5, 0.5, f"no {Path(artifact_path).name}\nin MLflow:\nnever rendered", ha="center",
                        va="center", transform=ax.transAxes, color="0.3")
            else:
                ax.imshow(Image.open(image).convert("RGB"))  # a greyscale manifold in grey, not a colour map
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return missing


def _cell(value: object) -> str:
    """A number to 4 significant digits, its exponent unpadded (3.1e-6: the tables are wide), blank where NaN."""
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}".replace("e-0", "e-").replace("e+0", "e+")
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table padded into columns (numbers to the right), so that it reads in a terminal as well as
    rendered; numbers to 4 significant digits, blank where there is none (NaN)."""
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    right = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    widths = [max([3, len(str(c)), *(len(row[i]) for row in cells)]) for i, c in enumerate(frame.columns)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line([str(c) for c in frame.columns]), rule, *(line(row) for row in cells)]) + "\n"


def prose(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(p, WIDTH) for p in paragraphs) + "\n"


def left_out_markdown(left: pd.DataFrame) -> str:
    """`compare.left_out`'s runs by name and id: a line for each with no run counted in its place (never evaluated),
    then a table of those that a later run of their setting and seed replaces, beside the one counted."""
    if left.empty:
        return ""
    alone = [f"- {r.run} ({r.run_id}): {r.reason}\n" for r in left.itertuples() if not r.counted]
    text = "\n## Runs left out of the statistics\n\n" + "".join(alone)
    older = left[left["counted"] != ""]
    if len(older):
        replaced = older.assign(**{"left out": older["run"] + " (" + older["run_id"] + ")"})
        text += ("\n" if alone else "") + prose(
            "A setting and seed with several runs (a re-run, another commit, a CPU and a GPU run) counts once: the "
            "latest finished.") + "\n" + markdown_table(replaced[["group", "seed", "counted", "left out"]])
    return text


def difference_tables(diffs: pd.DataFrame) -> str:
    """`compare.differences` as one table per metric: the parameter and its values a and b, the groups and their
    n (a/b), the means, b - a, the p-value and its q (to 2 significant digits, all they say) and the verdict."""
    text = ""
    rounded = diffs.assign(**{c: diffs[c].map(lambda v: float(f"{v:.2g}")) for c in ("p_value", "q_value")})
    for metric, rows in rounded.groupby("metric", sort=False):
        shown = pd.DataFrame({
            "param": rows["parameter"], "a": rows["value_a"], "b": rows["value_b"],
            "groups": rows["group_a"].astype(str) + "/" + rows["group_b"].astype(str),
            "n": rows["n_a"].astype(str) + "/" + rows["n_b"].astype(str), "mean a": rows["mean_a"],
            "mean b": rows["mean_b"], "b - a": rows["difference"], "p": rows["p_value"], "q": rows["q_value"],
            "verdict": rows["verdict"]})
        text += f"\n## {metric}\n\n" + markdown_table(shown)
    return text
