"""`vaelab slurm`: a grid of DVC experiments as one Slurm job array, for grids that outgrow one machine.

Each array task clones the repository at the submitted commit into the node's scratch folder, runs
`dvc exp run -S <its point>` there and pushes the experiment back (to the workspace on a shared file system, or to
its git and DVC remotes), so edits and commits made after submitting reach no task. A grid's record in
.vaelab/slurm/ keeps its points, commit and jobs, for `status` and `resubmit`. docs/cluster.md has the set-up."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vaelab import config, store
from vaelab.stages import StageError, atomic_file
from vaelab.tracking import SLURM_JOB_TAG, SLURM_TASK_TAG

GRIDS = Path(".vaelab") / "slurm"  # in the workspace: grid records, and the tasks' logs under logs/
EXPERIMENT_PREFIX = "slurm"  # a task's DVC experiment is slurm-<job>-<task>
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}  # Slurm states of a task not yet ended
SHAREABLE_STORES = ("http://", "https://", "postgresql", "mysql", "mssql")  # stores many nodes may write at once


@dataclass
class Grid:
    """What was submitted: the points (DVC's `-S` overrides of params.yaml), the commit every task runs, where the
    tasks clone from and push to, and each Slurm job's array tasks (task index -> point index)."""

    commit: str
    points: list[list[str]]
    source: str  # the workspace's path, or the git remote's URL the nodes clone from and push to
    shared: bool  # the nodes see the workspace (and its DVC cache) on a shared file system
    checkpoints: str
    sbatch: list[str]  # the #SBATCH options, except --array
    extra: list[str]  # passed through to sbatch's command line
    jobs: list[dict] = field(default_factory=list)  # {"job": id, "tasks": [point index per task], "submitted": t}

    @property
    def id(self) -> str:
        return self.jobs[0]["job"]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The grid's points as `dvc exp run --queue -S ...` expands them: DVC's own parser (Hydra's sweep grammar:
    `a=1,2`, `range(0,3)`, `choice(adam,rmsprop)`)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    by_file = to_path_overrides(overrides)
    if other := sorted(set(by_file) - {"params.yaml"}):
        raise StageError(f"-S {other[0]}:...: vaelab's parameters are in params.yaml; give them without a file name")
    try:
        sweeps = get_hydra_sweeps(by_file)
    except (InvalidArgumentError, HydraException) as error:
        raise StageError(f"-S {' -S '.join(overrides)}: {str(error).splitlines()[0]}") from None
    return [sweep.get("params.yaml", []) for sweep in sweeps]


def check_points(points: list[list[str]], params_file: Path) -> None:
    """Every point applied to a copy of params.yaml, as `dvc exp run -S` applies it, and validated by the schema:
    the first bad one is named in one line, before anything is submitted."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as folder:
        for point in points:
            copy = Path(folder) / "params.yaml"
            shutil.copyfile(params_file, copy)
            try:
                apply_overrides(copy, point)
                config.load(copy)
            except InvalidArgumentError as error:
                raise StageError(f"the point {' '.join(point)}: {error}; nothing was submitted") from None
            except config.ParamsError as error:
                raise StageError(f"the point {' '.join(point)}: {str(error).removeprefix(f'{copy}: ')}; "
                                 "nothing was submitted") from None


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise StageError(f"git {' '.join(args)}: {result.stderr.strip().splitlines()[-1]}")
    return result.stdout.strip()


def check_committed(root: Path) -> str:
    """The commit the tasks will run; refuses uncommitted changes to tracked files, which no task would see."""
    names = _git(root, "diff", "HEAD", "--name-only").splitlines()  # staged or not
    if names:
        raise StageError(f"uncommitted changes to {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}: "
                         "each cluster task runs a commit, not the workspace; commit them (or stash them) first")
    return _git(root, "rev-parse", "HEAD")


def check_store() -> None:
    """Refuse a tracking store that tasks on several nodes cannot write at once."""
    uri = store.tracking_uri()
    if not uri.startswith(SHAREABLE_STORES):
        raise StageError(f"the MLflow tracking store {store.redacted(uri)} is on this machine's disk: tasks on several "
                         "nodes cannot write it at once (SQLite's locks fail over a network file system); set "
                         "MLFLOW_TRACKING_URI to the team's tracking server (docs/team.md)")


def check_remote(root: Path, remote: str, commit: str) -> str:
    """The URL of the git remote the nodes clone from; refuses a commit the remote does not have yet."""
    url = _git(root, "remote", "get-url", remote)
    if not _git(root, "branch", "--remotes", "--contains", commit, "--list", f"{remote}/*"):
        raise StageError(f"the commit {commit[:7]} is not on the git remote {remote} the nodes clone from; "
                         f"push it first (git push {remote})")
    if not _dvc(root, "remote", "default"):
        raise StageError("the tasks push their outputs to the DVC remote, and there is none by default; "
                         "add one that the nodes reach (dvc remote add -d NAME URL)")
    return url


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def job_script(grid: Grid, tasks: list[int], root: Path, max_running: int | None) -> str:
    """The sbatch script of one job array: task i runs the point `tasks[i]` as the DVC experiment
    slurm-<job>-<i> of the grid's commit, in a clone of its own, with OMP_NUM_THREADS = the task's CPUs."""
    array = f"0-{len(tasks) - 1}" + (f"%{max_running}" if max_running else "")
    logs = root / GRIDS / "logs"
    arms = "\n".join(f"  {task}) set -- {' '.join(f'-S {shlex.quote(o)}' for o in grid.points[point])} ;;"
                     for task, point in enumerate(tasks))
    q = shlex.quote
    if grid.shared:  # the workspace's DVC cache holds the data and takes the outputs; the push is git refs alone
        cache = _dvc(root, "cache", "dir") or str(root / ".dvc" / "cache")
        use_cache = f"dvc cache dir --local {q(cache)}"
        run, push = "dvc exp run", "dvc exp push --no-cache"
    else:  # the DVC remote holds them
        use_cache, run, push = ":", "dvc exp run --pull", "dvc exp push"  # a stage it cannot pull, it runs
    return f"""#!/bin/bash
#SBATCH --job-name=vaelab
{chr(10).join(f'#SBATCH {option}' for option in grid.sbatch)}
#SBATCH --array={array}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={logs}/%A_%a.log
# vaelab slurm: each array task is one DVC experiment of commit {grid.commit}, cloned from {grid.source}.
# The MLflow settings and credentials come from the submitting shell's environment (sbatch exports it).
set -euo pipefail
case "$SLURM_ARRAY_TASK_ID" in
{arms}
  *) echo "vaelab: no point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
name={EXPERIMENT_PREFIX}-$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID
export PATH={q(str(Path(sys.executable).parent))}:$PATH
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}} VAELAB_CHECKPOINTS={q(grid.checkpoints)} PYTHONUNBUFFERED=1
clock() {{ t=$EPOCHREALTIME; printf '%(%F %T)T.%s ' "${{t%.*}}" "${{t#*.}}"; }}  # each line's time (slurm_timings)
stamp() {{ clock; echo "vaelab: $name on $SLURMD_NODENAME, restart ${{SLURM_RESTART_COUNT:-0}}: $*"; }}
clone=${{VAELAB_SCRATCH:-${{TMPDIR:-/tmp}}}}/vaelab-$name
stamp start "$@"
rm -rf "$clone"
trap 'rm -rf "$clone"' EXIT
git clone --quiet --no-checkout {q(grid.source)} "$clone"
cd "$clone"
git -c advice.detachedHead=false checkout --quiet {grid.commit}
dvc config --local core.hardlink_lock true  # DVC's lock works on a network file system too
{use_cache}
stamp cloned
{run} --name "$name" "$@" 2>&1 | (trap '' TERM; while IFS= read -r line; do clock; echo "$line"; done)
stamp ran
{push} {q(grid.source)} "$name"
stamp pushed
"""


def _sbatch(script: str, extra: list[str]) -> str:
    """Submit; returns the job id, or says sbatch's own reason for refusing in one line."""
    result = subprocess.run(["sbatch", "--parsable", *extra], input=script, capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise StageError(f"sbatch refused the grid: {reason.removeprefix('sbatch: error: ')}; nothing was submitted")
    return result.stdout.strip().split(";")[0]


def _submit(grid: Grid, tasks: list[int], root: Path, max_running: int | None) -> str:
    script = job_script(grid, tasks, root, max_running)
    (root / GRIDS / "logs").mkdir(parents=True, exist_ok=True)
    job = _sbatch(script, grid.extra)
    grid.jobs.append({"job": job, "tasks": tasks, "submitted": time.time()})
    with atomic_file(root / GRIDS / f"{grid.id}.json") as partial:
        partial.write_text(json.dumps(asdict(grid), indent=1) + "\n")
    return job


def load_grid(root: Path, job: str | None) -> Grid:
    """The grid that the Slurm job `job` belongs to, or the latest submitted."""
    records = sorted((root / GRIDS).glob("*.json"), key=lambda path: path.stat().st_mtime)
    for path in reversed(records):
        grid = Grid(**json.loads(path.read_text()))
        if job is None or job in {entry["job"] for entry in grid.jobs}:
            return grid
    raise StageError(f"no grid {'of job ' + job + ' ' if job else ''}was submitted from this workspace "
                     f"({GRIDS}/ has none); submit one with `vaelab slurm submit -S ...`")


def require_slurm() -> None:
    if not shutil.which("sbatch"):
        raise StageError("sbatch not found: `vaelab slurm` runs on a Slurm cluster's login node; on one machine, "
                         "queue the grid with `dvc exp run --queue -S ...` and `dvc queue start`")


def submit(args: argparse.Namespace, root: Path) -> None:
    points = sweep_points(args.set_param)
    check_points(points, root / "params.yaml")
    if not args.dry_run:
        require_slurm()
    commit = check_committed(root)
    check_store()
    if not args.dry_run:
        from vaelab.access import check_access

        check_access(write=True)
    source = check_remote(root, args.remote, commit) if args.remote else str(root)
    checkpoints = str(Path(args.checkpoints).resolve()) if args.checkpoints else str(root / ".vaelab" / "checkpoints")
    options = [f"--cpus-per-task={args.cpus_per_task}"] + [
        f"--{name.replace('_', '-')}={value}" for name in ("partition", "time", "gpus_per_task")
        if (value := getattr(args, name)) is not None]
    grid = Grid(commit, points, source, not args.remote, checkpoints, options, args.sbatch_args)
    tasks = list(range(len(points)))
    if args.dry_run:
        print(job_script(grid, tasks, root, args.max_running))
        print(f"# {len(points)} experiment{'s' * (len(points) != 1)} of commit {commit[:7]}, for `sbatch --parsable"
              f"{''.join(' ' + shlex.quote(arg) for arg in grid.extra)}` (dry run: nothing submitted):")
        for task, point in enumerate(points):
            print(f"#   task {task}: {' '.join(point) or '(params.yaml as committed)'}")
        return
    job = _submit(grid, tasks, root, args.max_running)
    print(f"Submitted Slurm job {job}: {len(points)} experiment{'s' * (len(points) != 1)} of commit {commit[:7]}"
          f"{f', at most {args.max_running} at once' if args.max_running else ''}.")
    print(f"  follow them:  vaelab slurm status {job}   (logs: {GRIDS}/logs/{job}_<task>.log)")
    print(f"  when they end: dvc exp show{'' if grid.shared else ' (after dvc exp pull ' + args.remote + ')'}; "
          f"vaelab compare --tag {SLURM_JOB_TAG}={job}")


def _task_states(jobs: list[str]) -> dict[str, tuple[str, str]]:
    """'<job>_<task>' -> (Slurm state, node) for the tasks Slurm still knows: squeue's pending and running ones,
    then `scontrol show job`'s recently ended ones (Slurm forgets them after MinJobAge; sacct, where accounting is
    on, remembers longer)."""
    states: dict[str, tuple[str, str]] = {}
    ids = ",".join(jobs)
    queued = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%N"], capture_output=True, text=True)
    for line in queued.stdout.splitlines():
        task, state, node = line.split("|")
        states[task] = (state, node)
    for job in jobs:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        for line in shown.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("ArrayTaskId", "").isdigit():
                states.setdefault(f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}",
                                  (fields["JobState"], fields.get("NodeList", "")))
    accounted = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobID,State,NodeList"],
                               capture_output=True, text=True) if shutil.which("sacct") else None
    for line in accounted.stdout.splitlines() if accounted and accounted.returncode == 0 else []:
        task, state, node = line.split("|")
        states.setdefault(task, (state.split()[0], node))
    return states


def _experiments(grid: Grid) -> set[str]:
    """The names of the grid's experiments that have arrived where the tasks push them."""
    refs = subprocess.run(["git", "ls-remote", grid.source, f"refs/exps/*/{EXPERIMENT_PREFIX}-*"],
                          capture_output=True, text=True).stdout
    return {line.rsplit("/", 1)[1] for line in refs.splitlines()}


def mlflow_runs(grid: Grid) -> dict[str, tuple[str, str]]:
    """'<job>_<task>' -> (MLflow run id, status), from the runs tagged with the grid's jobs."""
    client = store.open_client()
    experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", store.EXPERIMENT_NAME))
    if experiment is None:
        return {}
    runs = [run for entry in grid.jobs for run in client.search_runs(
        [experiment.experiment_id], f"tags.`{SLURM_JOB_TAG}` = '{entry['job']}'", max_results=10_000)]
    return {f"{run.data.tags[SLURM_JOB_TAG]}_{run.data.tags.get(SLURM_TASK_TAG)}": (run.info.run_id, run.info.status)
            for run in runs}


def point_table(grid: Grid) -> list[dict[str, str]]:
    """Each point with its latest task: Slurm state and node, DVC experiment, MLflow run."""
    states, arrived = _task_states([entry["job"] for entry in grid.jobs]), _experiments(grid)
    try:
        runs = mlflow_runs(grid)
    except Exception as error:  # the table still tells Slurm's side
        print(f"note: MLflow runs not shown: {store.short_reason(error)}", file=sys.stderr)
        runs = {}
    latest = {point: f"{entry['job']}_{task}" for entry in grid.jobs for task, point in enumerate(entry["tasks"])}
    rows = []
    for point, overrides in enumerate(grid.points):
        task = latest[point]
        experiment = f"{EXPERIMENT_PREFIX}-{task.replace('_', '-')}"
        state, node = states.get(task, ("ENDED", ""))
        run_id, run_status = runs.get(task, ("", ""))
        rows.append({"point": " ".join(overrides) or "(params.yaml)", "task": task, "state": state, "node": node,
                     "experiment": experiment if experiment in arrived else "",
                     "run": f"{run_id[:12]} {run_status}".strip(), "index": point})
    return rows


def _lost(row: dict) -> bool:
    """A point whose task has ended without its experiment arriving: failed, cancelled, or forgotten by Slurm."""
    return not row["experiment"] and row["state"] not in ACTIVE


def status(args: argparse.Namespace, root: Path) -> None:
    require_slurm()
    grid = load_grid(root, args.job)
    rows = point_table(grid)
    width = max(len(row["point"]) for row in rows)
    print(f"grid of job {grid.id}: {len(rows)} point{'s' * (len(rows) != 1)} of commit {grid.commit[:7]}; jobs "
          f"{', '.join(entry['job'] for entry in grid.jobs)}")
    print(f"{'point':<{width}}  {'task':<10} {'state':<11} {'node':<8} {'experiment':<18} MLflow run")
    for row in rows:
        print(f"{row['point']:<{width}}  {row['task']:<10} {row['state']:<11} {row['node']:<8} "
              f"{row['experiment'] or '-':<18} {row['run'] or '-'}")
    done, failed = sum(bool(row["experiment"]) for row in rows), sum(map(_lost, rows))
    print(f"{done} arrived, {len(rows) - done - failed} pending or running, {failed} failed or lost"
          + (f": `vaelab slurm resubmit {grid.id}` runs those again at {grid.commit[:7]}" if failed else ""))


def resubmit(args: argparse.Namespace, root: Path) -> None:
    require_slurm()
    grid = load_grid(root, args.job)
    rows = point_table(grid)
    again = [row["index"] for row in rows if _lost(row)]
    if not again:
        print(f"nothing to resubmit: every point of grid {grid.id} has arrived or is pending or running")
        return
    job = _submit(grid, again, root, args.max_running)
    print(f"Submitted Slurm job {job}: the {len(again)} points of grid {grid.id} that failed or never ran, "
          f"at commit {grid.commit[:7]}.  Follow them: vaelab slurm status {grid.id}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vaelab slurm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="submit a grid of experiments as one job array")
    sub.add_argument("-S", "--set-param", action="append", default=[], metavar="PARAM=VALUES",
                     help="as `dvc exp run --queue -S`: e.g. -S 'latent_dim=2,8' -S 'seed=range(0,3)'")
    sub.add_argument("--partition", metavar="NAME")
    sub.add_argument("--time", metavar="LIMIT", help="each task's time limit, as sbatch takes it (e.g. 2:00:00)")
    sub.add_argument("--cpus-per-task", type=int, default=1, metavar="N", help="also each training's threads (default 1)")
    sub.add_argument("--gpus-per-task", type=int, metavar="N")
    sub.add_argument("--max-running", type=int, metavar="N", help="how many tasks at once (sbatch --array=...%%N)")
    sub.add_argument("--remote", metavar="GIT_REMOTE", help="the git remote the nodes clone from and push to, when they cannot "
                     "reach this workspace (outputs go to the default DVC remote)")
    sub.add_argument("--checkpoints", metavar="DIR", help="a folder every node sees (default: .vaelab/checkpoints here)")
    sub.add_argument("--dry-run", action="store_true", help="print the job script and the points; submit nothing")
    sub.add_argument("sbatch_args", nargs="*", metavar="-- SBATCH_ARGS", help="anything else, passed to sbatch")
    for name, text in (("status", "each point's Slurm state, experiment and MLflow run"),
                       ("timings", "where each finished task's time went: queue, clone, stages, DVC, push"),
                       ("resubmit", "submit again the points that failed or never ran, at the grid's commit")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", nargs="?", help="any Slurm job id of the grid (default: the latest grid)")
        if name == "resubmit":
            command.add_argument("--max-running", type=int, metavar="N")
    args = parser.parse_args(argv)
    for name in ("cpus_per_task", "gpus_per_task", "max_running"):
        if (value := getattr(args, name, None)) is not None and value < 1:
            raise StageError(f"--{name.replace('_', '-')}: {value} is not allowed; expected a positive integer")
    root = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    if args.command == "timings":
        from vaelab.slurm_timings import timings as command
    else:
        command = {"submit": submit, "status": status, "resubmit": resubmit}[args.command]
    command(args, root)
