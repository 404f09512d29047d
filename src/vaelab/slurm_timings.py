"""`vaelab slurm timings`: where a grid's time went, read from its tasks' logs, whose every line the job script
stamps: the wait in Slurm's queue, the clone and checkout, each stage (the time it reports as its process ends),
DVC's own work (the rest of `dvc exp run`), and the push. The overhead of running on the cluster is the clone,
DVC's own work and the push, against the training's time."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from vaelab.slurm import GRIDS, Grid

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (.*)$")
STAMP = re.compile(r"^vaelab: \S+ on (\S*), restart \d+: (start|cloned|ran|pushed)\b")
STAGE_DONE = re.compile(r"^(prepare|train|evaluate|render): done in ([\d.]+) s$")  # stages.run_stage's last line
STAGES = ("prepare", "train", "evaluate", "render")


def attempt_timings(log: str) -> dict[str, float | str] | None:
    """The phases of a task's last attempt (a requeued task's log holds each attempt), in seconds, with its start
    time (`start`, seconds since the epoch) and node; None before it has pushed its experiment."""
    lines = []
    for text in log.splitlines():
        if match := LINE.match(text):
            lines.append((datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").timestamp(), match[2]))
    starts = [i for i, (_, text) in enumerate(lines) if (m := STAMP.match(text)) and m[2] == "start"]
    if not starts:
        return None
    attempt = lines[starts[-1]:]
    stamps = {m[2]: (t, m[1]) for t, text in attempt if (m := STAMP.match(text))}
    if "pushed" not in stamps:
        return None
    timings: dict[str, float | str] = {"start": stamps["start"][0], "node": stamps["start"][1]}
    for _, text in attempt:
        if match := STAGE_DONE.match(text):
            timings[match[1]] = float(match[2])
    stage_time = sum(timings.get(name, 0.0) for name in STAGES)
    timings |= {"clone": stamps["cloned"][0] - stamps["start"][0], "push": stamps["pushed"][0] - stamps["ran"][0],
                "dvc": stamps["ran"][0] - stamps["cloned"][0] - stage_time}
    timings["overhead"] = timings["clone"] + timings["dvc"] + timings["push"]
    return timings


def grid_timings(grid: Grid, root: Path) -> list[dict]:
    """Each task of the grid that has pushed its experiment: its phases, and its wait since its job's submission."""
    rows = []
    for entry in grid.jobs:
        for task in range(len(entry["tasks"])):
            log = root / GRIDS / "logs" / f"{entry['job']}_{task}.log"
            if log.exists() and (timings := attempt_timings(log.read_text(errors="replace"))):
                rows.append({"task": f"{entry['job']}_{task}", "wait": timings["start"] - entry["submitted"],
                             **timings})
    return rows


def timings(args, root: Path) -> None:
    from vaelab.slurm import load_grid

    grid = load_grid(root, args.job)
    rows = grid_timings(grid, root)
    if not rows:
        print(f"no task of grid {grid.id} has pushed its experiment yet")
        return
    print(f"grid of job {grid.id}, seconds per finished task (the last attempt of a requeued one):")
    columns = ("wait", "clone", *STAGES, "dvc", "push", "overhead")
    print(f"{'task':<10} {'node':<8}" + "".join(f"{name:>9}" for name in columns) + "  overhead/train")
    for row in rows:
        share = row["overhead"] / row["train"] if row.get("train") else float("nan")
        print(f"{row['task']:<10} {row['node']:<8}" + "".join(f"{row.get(name, 0.0):9.1f}" for name in columns)
              + f"  {share:13.1%}")
    submitted = grid.jobs[0]["submitted"]
    print("overhead = clone and checkout + DVC's own work around the stages + push (docs/cluster.md)")
    print(f"the first task started {min(row['start'] for row in rows) - submitted:.1f} s after submission"
          + (f", the first epoch ended {first - submitted:.1f} s after it" if (first := _first_epoch(grid)) else ""))


def _first_epoch(grid: Grid) -> float | None:
    """When the grid's first epoch ended (seconds since the epoch), from its MLflow runs' first metrics."""
    from vaelab.slurm import mlflow_runs
    from vaelab.store import open_client
    from vaelab.tracking import metric_name

    try:
        client = open_client()
        times = [metric.timestamp / 1000 for run_id, _ in mlflow_runs(grid).values()
                 for metric in client.get_metric_history(run_id, metric_name("val_neg_elbo")) if metric.step == 1]
    except Exception:  # the table stands without it
        return None
    return min(times, default=None)
