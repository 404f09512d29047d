"""The one MLflow run per trained parameter set: `train` opens it, sends metrics from a background thread, records
the machine's use (system metrics) and ends it; `handoff` passes its id to the later stages, which log into that
same run. Nothing here is imported by the model or the training maths."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from vaelab.config import Params
from vaelab.data import md5
from vaelab.mlflow_model import log_model_once
from vaelab.model import ModelConfig
from vaelab.store import (
    ABANDON_PATIENCE_SECONDS,
    EXPERIMENT_NAME,
    REPORT_AFTER_SECONDS,
    TrackerAway,
    away_message,
    get_or_create_experiment,
    not_answering,
    open_client,
    patience_seconds,
    patiently,
    redacted,
    refusal_of,
    store_lock,
    tracking_uri,
    transient,
)

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

PARAMS_TAG, HOST_TAG, PID_TAG = "vaelab.params_digest", "vaelab.host", "vaelab.pid"
THREADS_TAG = "vaelab.torch_threads"  # CPU threads of the run (OMP_NUM_THREADS): speed and float rounding
# a run made by a Slurm job array task (`vaelab slurm`): its job, task, node and how often Slurm requeued it
SLURM_JOB_TAG, SLURM_TASK_TAG = "vaelab.slurm.job", "vaelab.slurm.task"
SLURM_NODE_TAG, SLURM_RESTARTS_TAG = "vaelab.slurm.node", "vaelab.slurm.restarts"
SYSTEM_METRICS_SECONDS = 1.0  # how often the machine's use is recorded


def metric_name(key: str) -> str:
    """The MLflow name of a history or test key (`reports/` keeps the keys). MLflow 3.17's run page and chart
    view make a section of the charts of each name's part before its last '/', the sections in name order and
    names without one last, under "Model metrics" (its UI bundle's `extractChartSectionName`). So the learning
    curves come first, then the test numbers (single values: bar charts), the per-digit and per-dimension
    values, and the schedule apart at the end."""
    if key in ("lr", "kl_weight"):
        return f"train_schedule/{key}"
    if key.startswith(("train_", "val_")):
        return f"learning_curve/{key}"
    if key.startswith("test_neg_elbo_digit_"):
        return f"test_per_digit/{key.removeprefix('test_')}"
    if key.startswith("test_kl_z"):
        return f"test_per_dimension/{key.removeprefix('test_')}"
    if key.startswith("test_"):
        return f"test/{key.removeprefix('test_')}"
    return key


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_tags(params: Params) -> dict[str, str]:
    """The git commit, who runs it with how many CPU threads (and in which Slurm array task), and a name that says
    what was trained: under `dvc exp run` the DVC experiment's name (with its baseline), under `dvc repro` the
    branch and short commit, e.g. `main@1a2b3c4`."""
    tags = {PARAMS_TAG: params.digest(), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            THREADS_TAG: str(torch.get_num_threads())}
    if commit := _git("rev-parse", "HEAD"):
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags["mlflow.runName"] = f"{branch}@{commit[:7]}" if branch and branch != "HEAD" else commit[:7]
    if name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = name
        tags["mlflow.runName"] = name
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = baseline
    if job := os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"):
        tags |= {SLURM_JOB_TAG: job, SLURM_TASK_TAG: os.environ.get("SLURM_ARRAY_TASK_ID", ""),
                 SLURM_NODE_TAG: os.environ.get("SLURMD_NODENAME", ""),
                 SLURM_RESTARTS_TAG: os.environ.get("SLURM_RESTART_COUNT", "0")}
    return tags


def _last_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The last epoch whose metric `key` the store has (0 for none): one key tells, since every epoch's
    metrics go into the store together."""
    return max((metric.step for metric in client.get_metric_history(run_id, key)), default=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close_orphans(client: MlflowClient, experiment_id: str, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs, whatever their parameters, whose process on this host is gone (kill -9, a
    crash, a power cut). Their checkpoints stay: training those parameters again resumes the same run."""
    orphans = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{HOST_TAG}` = '{socket.gethostname()}' and attributes.status = 'RUNNING'",
    )
    for run in orphans:
        tags = run.data.tags
        if run.info.run_id != keep and not _alive(int(tags.get(PID_TAG, "0"))):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


class TrainingRun:
    """The MLflow run of one training. Its data sets and per-epoch metrics go out from a background thread, so
    training never waits for the tracker once the run is open: while a server is down or a SQLite store is
    locked they wait in memory (the checkpoint holds the metrics too, in the training history) and go out in
    order, each epoch once, when the tracker answers again.

    Each batch holds whole epochs and the store writes a batch at once, so the last epoch the store has
    tells what was delivered; it is asked again after every failure and when `resume_id` continues the run
    that an interrupted training of the same parameters left behind."""

    FLUSH_SECONDS = 10.0
    MAX_RETRY_SECONDS = 60.0

    def __init__(self, params: Params, resume_id: str | None = None):
        self.client = open_client()
        self.run_id = patiently(lambda: self._open(params, resume_id), "the run's start", None)
        self._rows: list[tuple[int, list[Metric]]] = []  # (epoch, its metrics), oldest first
        self._datasets: list[DatasetInput] = []  # the data sets the run trains on, until they are sent
        self._sent_through = 0  # the last epoch the store has, when `_synced`
        self._synced = resume_id != self.run_id  # a new run has nothing yet
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._away: Exception | None = None  # the tracker's last error, while it does not answer
        self._failure: Exception | None = None  # an error that retrying would not mend
        self._told_away = False
        self._sender = threading.Thread(target=self._send_until_closed, name="mlflow-sender", daemon=True)
        self._sender.start()
        self._system = system_metrics(self.run_id)

    def _open(self, params: Params, resume_id: str | None) -> str:
        tags = run_tags(params)
        with store_lock():
            experiment_id = get_or_create_experiment(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME))
            run_id = resume_id if resume_id and self._exists(resume_id) else None
            _close_orphans(self.client, experiment_id, keep=run_id)
            if run_id:
                self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            else:
                run = self.client.create_run(experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
                run_id = run.info.run_id
                params_logged = [Param(k, str(v)) for k, v in params.training_dict().items()]
                self.client.log_batch(run_id, params=params_logged)
        return run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException as error:
            if transient(error):
                raise
            return False
        return True

    def log_training_data(self, data_dir: Path, contexts: dict[str, str]) -> None:
        """Queue the prepared splits the run trains on, as MLflow dataset inputs (the runs table's Dataset
        column), for the sender thread: each named `mnist-<split>`, its digest the md5 that DVC records for the
        file, its source the file's path in the project; `contexts` maps each split to its role (training,
        validation). The store keeps an input once, however often it is sent."""
        inputs = []
        for split, context in contexts.items():
            path = Path(data_dir) / f"{split}.pt"
            source = get_dataset_source_from_json(json.dumps({"uri": path.as_posix()}), source_type="local")
            dataset = MetaDataset(source, name=f"mnist-{split}", digest=md5(path))._to_mlflow_entity()
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        with self._lock:
            self._datasets = inputs

    def log_epoch(self, row: dict[str, float]) -> None:
        """Queue an epoch's metrics; the sender thread delivers them."""
        now = int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [Metric(metric_name(k), float(v), now, step) for k, v in row.items() if k != "epoch"]
        with self._lock:
            self._rows += [(step, metrics)] if metrics else []

    @property
    def away(self) -> bool:
        """Whether the tracker failed to answer the last try."""
        return self._away is not None

    @property
    def ended(self) -> bool:
        return self._closing.is_set()

    @property
    def backlog(self) -> int:
        """How many epochs wait to be sent."""
        with self._lock:
            return sum(epoch > self._sent_through for epoch, _ in self._rows)

    def news(self) -> str | None:
        """One line when the tracker stops or starts answering, for the progress display; else None."""
        if self._away is not None and not self._told_away:
            self._told_away = True
            return f"{not_answering(self._away)}; training goes on and its metrics wait to be sent"
        if self._away is None and self._told_away:
            self._told_away = False
            return f"MLflow: {redacted(tracking_uri())} answers again; the waiting metrics are sent"
        return None

    def _send_until_closed(self) -> None:
        client = MlflowClient(tracking_uri())
        delay = 0.0
        while not self._closing.wait(timeout=delay or self.FLUSH_SECONDS):
            delay = self._try_send(client, delay)
        while self._failure is None and (self.backlog or self._datasets):  # closing: send what is left
            time.sleep(delay)
            delay = self._try_send(client, delay)

    def _try_send(self, client: MlflowClient, delay: float) -> float:
        """Send what waits; returns how long to wait before the next try (0 after a success)."""
        try:
            self._send(client)
        except Exception as error:  # noqa: BLE001  (kept for the main thread, which reports it)
            if not transient(error):
                self._failure = refusal_of(error) or error
                return 0.0
            self._away, self._synced = error, False
            return min(max(2 * delay, 1.0), self.MAX_RETRY_SECONDS)
        self._away = None
        return 0.0

    def _send(self, client: MlflowClient) -> None:
        with self._lock:
            rows = [row for row in self._rows if row[0] > self._sent_through]
            datasets = self._datasets
        if datasets:
            with store_lock():
                client.log_inputs(self.run_id, datasets=datasets)
            self._datasets = []
        if rows and not self._synced:
            self._sent_through = _last_step(client, self.run_id, rows[0][1][0].key)
            self._synced = True
            rows = [row for row in rows if row[0] > self._sent_through]
        batch: list[Metric] = []
        for i, (epoch, metrics) in enumerate(rows):
            batch += metrics
            following = len(rows[i + 1][1]) if i + 1 < len(rows) else None
            if following is None or len(batch) + following > 1000:  # MLflow's limit per batch
                with store_lock():
                    client.log_batch(self.run_id, metrics=batch)
                self._sent_through, batch = epoch, []
        with self._lock:
            self._rows = [row for row in self._rows if row[0] > self._sent_through]

    def end(self, status: str, model: tuple[Path, ModelConfig] | None = None, patience: float | None = None) -> None:
        """Deliver the waiting metrics and `model` (the weights file and its config), then mark the run
        `status`. A tracker that stays away longer than `patience` seconds (VAELAB_TRACKING_PATIENCE_SECONDS,
        5 minutes by default) ends this with a one-line TrackerAway, and the run stays as it is."""
        patience = patience_seconds() if patience is None else patience
        started = time.monotonic()
        self._closing.set()
        # the machine's last points, sent beside the metrics: a locked store or a server away holds it, not the end
        sampling = threading.Thread(target=self._system.finish, daemon=True) if self._system else None
        if sampling is not None:
            sampling.start()
        deadline, reported = started + patience, False
        while self._sender.is_alive() and (left := deadline - time.monotonic()) > 0:
            self._sender.join(timeout=min(left, 0.5))
            if not reported and self._sender.is_alive() and time.monotonic() - started >= REPORT_AFTER_SECONDS:
                print(f"{not_answering(self._away)}; {self.backlog} epochs of metrics wait; trying again for up "
                      f"to {deadline - time.monotonic():.0f} s", file=sys.stderr)
                self._told_away = reported = True
        if self._failure is not None:
            raise self._failure
        if self._sender.is_alive():
            waiting = [f"{'' if self._synced else 'up to '}{self.backlog} epochs of metrics"]
            waiting += ["the run's data sets"] * bool(self._datasets) + ["the model"] * (model is not None)
            waiting += [f"the run's end ({status})"]
            raise TrackerAway(away_message(self._away, ", ".join(waiting), patience, self.run_id))
        if news := self.news():  # a tracker that was reported away and came back after the last epoch
            print(news, file=sys.stderr)
        if model is not None:
            patiently(lambda: log_model_once(self.client, self.run_id, *model), f"the model, the run's end ({status})",
                      self.run_id, patience, started)
        if sampling is not None:  # before the run stops being RUNNING
            sampling.join(timeout=max(0.0, deadline - time.monotonic()))

        def terminate():
            with store_lock():
                self.client.set_terminated(self.run_id, status)

        patiently(terminate, f"the run's end ({status})", self.run_id, patience, started)


def system_metrics(run_id: str) -> SystemMetricsMonitor | None:
    """MLflow's own sampler of the machine's CPU, memory, disk, network and GPU use (the run page's "System metrics"),
    started for `run_id`: a point a second, a few hundred for a 200-epoch CPU run, until the run ends or the tracker
    stops answering. None, said in one line, where psutil (or for the GPU, nvidia-ml-py) is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as missing:
        print(f"note: this run records no system metrics: {missing.name} is not installed (pip install "
              f"{missing.name})", file=sys.stderr)
        return None
    if torch.cuda.is_available() and importlib.util.find_spec("pynvml") is None:
        print("note: this run records no GPU use: nvidia-ml-py is not installed (pip install nvidia-ml-py)",
              file=sys.stderr)
    # quiet: a tracker that goes away ends the sampling (our sender says so in one line), not a logged traceback
    logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, resume_logging=True,
                                   tracking_uri=tracking_uri())
    monitor.start()
    return monitor


@contextmanager
def training_run(params: Params, resume_id: str | None = None) -> Iterator[TrainingRun]:
    """A run that ends FINISHED (unless the body ended it), KILLED on Ctrl-C or SIGTERM, or FAILED on any
    other error. After an interruption or an error the tracker gets a short wait only, and a tracker that
    is away leaves the run to the next training on this host, which closes it."""
    run = TrainingRun(params, resume_id)
    try:
        yield run
    except TrackerAway:
        raise
    except BaseException as error:
        status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
        try:
            run.end(RunStatus.to_string(status), patience=ABANDON_PATIENCE_SECONDS)
        except TrackerAway as away:
            print(f"warning: {away}", file=sys.stderr)
        raise
    if not run.ended:
        run.end(RunStatus.to_string(RunStatus.FINISHED))
