"""Everything MLflow: the store, the one run per trained parameter set, metrics, figures and the model.

`train` starts the run and hands its id to the later stages through a small JSON file; `evaluate` and
`render` log into that same run. Nothing here is imported by the model or the training maths.
"""
from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import vaelab
from vaelab.config import Params
from vaelab.data import NOT_FOUND, DamagedInput, md5
from vaelab.model import DIGITS, LabelMismatch, ModelConfig, load_vae
from vaelab.stages import StageError, project_root

T = TypeVar("T")
EXPERIMENT_NAME = "vaelab"
STORE_FILE = "mlflow.db"  # MLflow's own default name for a SQLite store
ARTIFACT_DIR = "mlartifacts"  # beside the SQLite store, as `mlflow server` names it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what kind of experiment this is; MLflow 3.17's UI ignores it
PARAMS_TAG, HOST_TAG, PID_TAG = "vaelab.params_digest", "vaelab.host", "vaelab.pid"
THREADS_TAG = "vaelab.torch_threads"  # CPU threads of the run (OMP_NUM_THREADS): speed and float rounding
REACHABLE_TIMEOUT_S = 5
PATIENCE_VARIABLE, DEFAULT_PATIENCE_SECONDS = "VAELAB_TRACKING_PATIENCE_SECONDS", 300.0
REPORT_AFTER_SECONDS = 3.0  # a wait at the end longer than this is reported
ABANDON_PATIENCE_SECONDS = 10.0  # after Ctrl-C or an error: the next training closes the run anyway
TRANSIENT_ERROR_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# A call to a server that went away fails in seconds, not after minutes of MLflow's default retries;
# `patiently` and the sender thread do the waiting, with a bound.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class _QuietWhileLocked(logging.Filter):
    """MLflow's SQLite store logs a locked database with a traceback of some 60 lines before it raises the
    error that `patiently` and the sender thread wait out and report in one line; other errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietWhileLocked())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def redacted(uri: str) -> str:
    """The URI without a password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port or ''}".rstrip(":")))


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock() -> Iterator[None]:
    """Serialise writes to a SQLite store across processes (parallel DVC queue workers): SQLite allows
    one writer at a time and MLflow would otherwise fail with "database is locked" or race to create
    the tables. Other stores handle concurrency themselves."""
    database = _sqlite_path(tracking_uri())
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_access(write: bool, patient: bool = False, experiment: str | None = None) -> None:
    """Fail within seconds, before any work, when an HTTP tracking server does not answer (most likely a wrong
    address), refuses the user's name or password (401), or, with `write`, does not let the user write to the
    experiment (an authenticating server: `mlflow server --app-name basic-auth`): one line each, never retried.
    `patient` stages (those after `train`, whose server answered before) wait for an answer as `patiently`
    does, for a server that is restarting."""
    patience_seconds()  # a bad value is named now, not when a stage ends
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return

    def probe() -> None:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACHABLE_TIMEOUT_S):
            pass

    try:
        if patient:
            patiently(probe, "the stage's start", None)
        else:
            probe()
    except (OSError, ValueError) as error:
        raise StageError(f"the MLflow tracking server {redacted(uri)} does not answer ({error}); "
                         "start it or point MLFLOW_TRACKING_URI elsewhere") from None
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
    status, found = _server_get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    if status in (401, 403):
        raise AccessRefused(_refusal(status, experiment, "read"))
    if write and status == 200 and (refusal := write_refusal(found["experiment"]["experiment_id"], experiment)):
        raise AccessRefused(refusal)


class AccessRefused(StageError):
    """The tracking server refused the user: a wrong name or password, or no permission. Waiting mends neither."""


REFUSED = ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED")  # MLflow's codes of a 401 and a 403
WRITE_PERMISSIONS = ("EDIT", "MANAGE")  # MLflow's auth app: READ reads, EDIT logs runs, MANAGE also grants


def _user() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_USERNAME")


def _server_get(path: str, **query: str) -> tuple[int, dict]:
    """GET `path` on the tracking server as the user MLflow's client would send (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, HTTP basic authentication): the status and the JSON answer ({} when there is none)."""
    request = urllib.request.Request(f"{tracking_uri().rstrip('/')}{path}?{urllib.parse.urlencode(query)}")
    if _user() is not None:
        credentials = f"{_user()}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    try:
        with urllib.request.urlopen(request, timeout=REACHABLE_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as refused:
        return refused.code, {}
    except (OSError, ValueError) as error:
        raise StageError(f"the MLflow tracking server {redacted(tracking_uri())} does not answer ({error}); "
                         "start it or point MLFLOW_TRACKING_URI elsewhere") from None


def write_refusal(experiment_id: str, experiment: str) -> str | None:
    """Why the user may not write to the experiment, in one line, or None if they may (or the server checks no
    permissions: it has no auth app, whose permission route is then missing)."""
    if not tracking_uri().startswith(("http://", "https://")):
        return None
    status, permission = _server_get("/api/3.0/mlflow/users/permissions/get", username=_user() or "",
                                     resource_type="experiment", resource_id=experiment_id)
    if status != 200 or permission.get("permission") in WRITE_PERMISSIONS:
        return None
    if _server_get("/api/2.0/mlflow/users/current")[1].get("user", {}).get("is_admin"):
        return None
    return _refusal(403, experiment, "write to", permission.get("permission", "none"))


def _refusal(status: int, experiment: str, action: str, permission: str | None = None) -> str:
    """The one line for a refused request: who was refused by which server, and why."""
    server = f"the MLflow tracking server {redacted(tracking_uri())}"
    if status == 401:
        if _user() is None:
            return f"{server} asks for a user name and password: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return (f"{server} refused user {_user()!r}: the user name or password is wrong "
                "(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)")
    wanted = "EDIT" if action == "write to" else "READ"
    held = f" (it holds {permission})" if permission else ""
    return (f"user {_user()!r} may not {action} experiment {experiment!r} on {server}{held}; ask the server's admin "
            f"for {wanted} permission on it")


def refusal_of(error: BaseException) -> AccessRefused | None:
    """A refused MLflow request (401, 403) as the one-line AccessRefused, else None."""
    if isinstance(error, MlflowException) and error.error_code in REFUSED:
        status = 403 if error.error_code == "PERMISSION_DENIED" else 401
        return AccessRefused(_refusal(status, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME), "write to"))
    return None


class TrackerAway(StageError):
    """The tracking server or store did not answer within the patience; what waits is kept for a rerun."""


def patience_seconds() -> float:
    """How long a stage waits, at its end, for a tracker that is away: VAELAB_TRACKING_PATIENCE_SECONDS."""
    value = os.environ.get(PATIENCE_VARIABLE, str(DEFAULT_PATIENCE_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StageError(f"{PATIENCE_VARIABLE}={value!r} is not allowed; expected a number of seconds, 0 or more")
    return seconds


def _transient(error: BaseException) -> bool:
    """Whether the tracker may answer a retry: a server down, restarting or overloaded, a store locked."""
    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_ERROR_CODES
    return isinstance(error, OSError)  # requests' and urllib3's connection errors are OSErrors


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "no answer yet"
    text = str(error)
    for known in ("Connection refused", "database is locked", "timed out", "Name or service not known",
                  "Connection reset", "Connection aborted"):
        if known.lower() in text.lower():
            return known.lower()
    return text.splitlines()[0][:160] if text else "no answer"


def _not_answering(error: BaseException | None) -> str:
    """`error` is None while the first try still waits (a SQLite store waits 20 s for a lock itself)."""
    return f"MLflow: {redacted(tracking_uri())} does not answer {f'({_reason(error)})' if error else 'yet'}"


def _away_message(error: BaseException | None, waiting: str, patience: float, run_id: str | None) -> str:
    uri = redacted(tracking_uri())
    away = (f"the MLflow store {uri} stayed locked for {patience:.0f} s (another process holds it: a sqlite3 shell, "
            "a backup?)" if _sqlite_path(uri) else
            f"the MLflow tracking server {uri} did not answer for {patience:.0f} s ({_reason(error)})")
    if run_id is None:
        return f"{away}; nothing was done ({waiting} needs it); run the stage again once it answers"
    return (f"{away}; waiting to be sent: {waiting}; the stage's outputs are written: once the tracker answers, run "
            f"the stage again (dvc repro) to send them into run {run_id} ({PATIENCE_VARIABLE} sets the wait)")


def patiently(attempt: Callable[[], T], waiting: str, run_id: str | None, patience: float | None = None,
              since: float | None = None) -> T:
    """`attempt()`, tried again with growing pauses while the tracker is away, until `patience` seconds
    (`patience_seconds()` by default) after `since` (a `time.monotonic()`, now by default); then a one-line
    TrackerAway that names the tracker, what waits (`waiting`) and how to send it into the run `run_id`."""
    patience = patience_seconds() if patience is None else patience
    deadline, delay = (time.monotonic() if since is None else since) + patience, 1.0
    while True:
        try:
            return attempt()
        except Exception as error:  # noqa: BLE001  (anything not transient is raised as it is)
            if refused := refusal_of(error):
                raise refused from None
            if not _transient(error):
                raise
            if time.monotonic() + delay > deadline:
                raise TrackerAway(_away_message(error, waiting, patience, run_id)) from None
            if delay == 1.0:
                print(f"{_not_answering(error)}; trying again for up to {deadline - time.monotonic():.0f} s",
                      file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def _client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock():  # opening a new SQLite store creates its tables: one process at a time
        return MlflowClient(uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment; two workers creating it at once both end with the same one."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        database = _sqlite_path(tracking_uri())
        try:
            return client.create_experiment(
                name,
                # beside the database, not in the working directory, which for a queued experiment is a
                # temporary copy that DVC deletes
                artifact_location=(database.parent / ARTIFACT_DIR).as_uri() if database else None,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def ui_link(base_url: str = "http://127.0.0.1:5000", uri: str = f"sqlite:///{STORE_FILE}") -> str:
    """The page to open in `mlflow ui`: the experiment's runs table in MLflow 3's "Model training" view
    (3.17 opens an experiment in its GenAI view otherwise, whatever its tags), or the home page before the
    first run. Reading a store that does not exist would create it, so that is checked first."""
    database = _sqlite_path(uri)
    if database is None or database.exists():
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
        experiment = MlflowClient(uri).get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "active":
            return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    return base_url


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_tags(params: Params) -> dict[str, str]:
    """The git commit, who runs it with how many CPU threads, and a name that says what was trained: under
    `dvc exp run` the DVC experiment's name (with its baseline), under `dvc repro` the branch and short
    commit, e.g. `main@1a2b3c4`."""
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
        self.client = _client()
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

    def _open(self, params: Params, resume_id: str | None) -> str:
        tags = run_tags(params)
        with store_lock():
            experiment_id = _experiment_id(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME))
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
            if _transient(error):
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
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]
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
            return f"{_not_answering(self._away)}; training goes on and its metrics wait to be sent"
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
            if not _transient(error):
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
        deadline, reported = started + patience, False
        while self._sender.is_alive() and (left := deadline - time.monotonic()) > 0:
            self._sender.join(timeout=min(left, 0.5))
            if not reported and self._sender.is_alive() and time.monotonic() - started >= REPORT_AFTER_SECONDS:
                print(f"{_not_answering(self._away)}; {self.backlog} epochs of metrics wait; trying again for up "
                      f"to {deadline - time.monotonic():.0f} s", file=sys.stderr)
                self._told_away = reported = True
        if self._failure is not None:
            raise self._failure
        if self._sender.is_alive():
            waiting = [f"{'' if self._synced else 'up to '}{self.backlog} epochs of metrics"]
            waiting += ["the run's data sets"] * bool(self._datasets) + ["the model"] * (model is not None)
            waiting += [f"the run's end ({status})"]
            raise TrackerAway(_away_message(self._away, ", ".join(waiting), patience, self.run_id))
        if news := self.news():  # a tracker that was reported away and came back after the last epoch
            print(news, file=sys.stderr)
        if model is not None:
            patiently(lambda: _log_model_once(self.client, self.run_id, *model), f"the model, the run's end ({status})",
                      self.run_id, patience, started)

        def terminate():
            with store_lock():
                self.client.set_terminated(self.run_id, status)

        patiently(terminate, f"the run's end ({status})", self.run_id, patience, started)


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


def write_run_id(path: Path, run_id: str) -> None:
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


def read_run_id(path: Path, required: bool = False) -> str | None:
    """The MLflow run id that `write_run_id` recorded in `path`. If the file is missing or is not such a record:
    None (train's checkpoint: a new run starts), or with `required` a DamagedInput that names the file and the cure
    (models/run.json, read by evaluate and render)."""
    try:
        saved = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        problem = NOT_FOUND
    except IsADirectoryError:
        problem = "is a folder, not a file"
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    except UnicodeDecodeError:
        problem = "is not JSON (a binary file)"
    except ValueError:  # json.JSONDecodeError
        problem = "is not valid JSON (truncated or damaged)"
    else:
        run_id = saved.get("run_id") if isinstance(saved, dict) else None
        if isinstance(run_id, str) and run_id.isprintable() and run_id.strip():
            return run_id
        problem = "is JSON without a run_id"
    if required:
        raise DamagedInput(path, problem, "train")
    return None


def add_to_run(run_id_file: Path, waiting: str, metrics: dict[str, float] | None = None,
               artifacts: dict[Path, str | None] | None = None) -> None:
    """Log a later stage's metrics (at step 0) and files or folders (to their artifact paths) into the run
    recorded by `train`, waiting for a tracker that is away as `TrainingRun.end` does. A retry resends the
    same metrics, with the same timestamps, which the store keeps once. A missing or damaged `run_id_file` is a
    DamagedInput: the stages check it before their work with `read_run_id(..., required=True)`."""
    run_id = read_run_id(run_id_file, required=True)
    client = _client()
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]

    def log() -> None:
        try:
            client.get_run(run_id)
        except MlflowException as error:
            if _transient(error):
                raise
            store = redacted(tracking_uri())
            raise StageError(f"MLflow run {run_id} (from {run_id_file}) is not in the store {store}; "
                             "re-train to create it there: dvc repro --force train") from None
        with store_lock():
            if batch:
                client.log_batch(run_id, metrics=batch)
            for path, artifact_path in (artifacts or {}).items():
                (client.log_artifacts if path.is_dir() else client.log_artifact)(run_id, str(path), artifact_path)

    patiently(log, waiting, run_id)


class DecoderModel(mlflow.pyfunc.PythonModel):
    """Latent vectors (n, latent_dim) in, decoded images (n, 28, 28) in [0, 1] out. A conditional VAE's takes
    {"z": latent vectors (n, latent_dim), "label": digits (n,)} and draws each z as the digit beside it."""

    def load_context(self, context) -> None:
        self.vae = load_vae(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """`model_input` is a dict of arrays for a conditional VAE (the signature's named tensors; MLflow refuses
        input of the other kind before this runs). The hint np.ndarray, one MLflow infers no schema from, keeps
        the logged signature and MLflow from warning about a predict without type hints."""
        if not self.vae.config.conditional:
            return self.vae.decode(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()
        z = torch.as_tensor(np.asarray(model_input["z"], dtype=np.float32))
        labels = torch.as_tensor(np.asarray(model_input["label"], dtype=np.int64))
        if labels.shape != (len(z),) or labels.min() < 0 or labels.max() >= DIGITS:
            raise LabelMismatch(f"'label' must hold one digit from 0 to 9 per latent vector ({len(z)})")
        return self.vae.decode(z, labels).numpy()


def _log_model_once(client: MlflowClient, run_id: str, weights: Path, config: ModelConfig) -> None:
    """Log the trained decoder as an MLflow pyfunc model that loads the weights-only checkpoint, unless an
    earlier try (one that lost its answer, or a stage run again) already did."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    z = TensorSpec(np.dtype(np.float32), (-1, config.latent_dim), "z" if config.conditional else None)
    labels = [TensorSpec(np.dtype(np.int64), (-1,), "label")] if config.conditional else []
    signature = ModelSignature(
        inputs=Schema([z, *labels]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
    )
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    if any(model.status == LoggedModelStatus.READY for model in logged):
        return
    with store_lock(), mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DecoderModel(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(vaelab.__file__).parent)],
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
