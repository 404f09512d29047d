"""The MLflow store: where it is, a lock that serialises writers to SQLite, and patience with a tracker that is
away (retried with a bound), refuses the user or shows a certificate that is not trusted (one line, never retried)."""
from __future__ import annotations

import fcntl
import logging
import os
import ssl
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.environment_variables import MLFLOW_TRACKING_SERVER_CERT_PATH
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import read_mlflow_creds

from vaelab.stages import StageError, project_root

T = TypeVar("T")
EXPERIMENT_NAME = "vaelab"
STORE_FILE = "mlflow.db"  # MLflow's own default name for a SQLite store
ARTIFACT_DIR = "mlartifacts"  # beside the SQLite store, as `mlflow server` names it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what kind of experiment this is; MLflow 3.17's UI ignores it
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


class AccessRefused(StageError):
    """The tracking server refused the user: a wrong name or password, or no permission. Waiting mends neither."""


REFUSED = ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED")  # MLflow's codes of a 401 and a 403
def tracking_user() -> str | None:
    """The user MLflow's client sends: MLFLOW_TRACKING_USERNAME, else ~/.mlflow/credentials."""
    return read_mlflow_creds().username


def refusal_message(status: int, experiment: str, action: str, permission: str | None = None) -> str:
    """The one line for a refused request: who was refused by which server, and why."""
    server = f"the MLflow tracking server {redacted(tracking_uri())}"
    if status == 401:
        if tracking_user() is None:
            return f"{server} asks for a user name and password: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return (f"{server} refused user {tracking_user()!r}: the user name or password is wrong "
                "(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)")
    wanted = "EDIT" if action == "write to" else "READ"
    held = f" (it holds {permission})" if permission else ""
    return (f"user {tracking_user()!r} may not {action} experiment {experiment!r} on {server}{held}; ask the server's admin "
            f"for {wanted} permission on it")


def untrusted_certificate(error: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check behind `error`, through the layers that wrap it (MLflow's MlflowException,
    requests' SSLError, urllib3's MaxRetryError and SSLError), else None."""
    while error is not None and not isinstance(error, ssl.SSLCertVerificationError):
        error = error.__cause__ or error.__context__
    return error


def untrusted_message(certificate: ssl.SSLCertVerificationError) -> str:
    """The one line for a server whose certificate MLflow's client does not trust: the variable that mends it."""
    bundle = MLFLOW_TRACKING_SERVER_CERT_PATH.get()
    return (f"the MLflow tracking server {redacted(tracking_uri())} presented a certificate that is not trusted "
            f"({certificate.verify_message}); set {MLFLOW_TRACKING_SERVER_CERT_PATH.name}"
            f"{f' (now {bundle})' if bundle else ''} to the CA bundle that signed it")


def refusal_of(error: BaseException) -> StageError | None:
    """A request that no retry mends as its one-line StageError: refused (401, 403: AccessRefused), or to a server
    whose certificate is not trusted; else None."""
    if certificate := untrusted_certificate(error):
        return StageError(untrusted_message(certificate))
    if isinstance(error, MlflowException) and error.error_code in REFUSED:
        status = 403 if error.error_code == "PERMISSION_DENIED" else 401
        return AccessRefused(refusal_message(status, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME), "write to"))
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


def transient(error: BaseException) -> bool:
    """Whether the tracker may answer a retry: a server down, restarting or overloaded, a store locked; not a
    certificate that is not trusted, which MLflow wraps as an INTERNAL_ERROR and requests raises as an OSError."""
    if untrusted_certificate(error):
        return False
    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_ERROR_CODES
    return isinstance(error, OSError)  # requests' and urllib3's connection errors are OSErrors


def short_reason(error: BaseException | None) -> str:
    """Why the tracker did not answer, in a few words: a known cause, else the first line of the innermost error
    (those wrapped around it, MLflow's and requests', lead with the address), never the password of a URI."""
    if error is None:
        return "no answer yet"
    for known in ("Connection refused", "database is locked", "timed out", "Name or service not known",
                  "Connection reset", "Connection aborted"):
        if known.lower() in str(error).lower():
            return known.lower()
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    uri = tracking_uri().rstrip("/")
    text = str(error).replace(uri, redacted(uri))
    return text.splitlines()[0][:160] if text else "no answer"


def not_answering(error: BaseException | None) -> str:
    """`error` is None while the first try still waits (a SQLite store waits 20 s for a lock itself)."""
    return f"MLflow: {redacted(tracking_uri())} does not answer {f'({short_reason(error)})' if error else 'yet'}"


def away_message(error: BaseException | None, waiting: str, patience: float, run_id: str | None) -> str:
    uri = redacted(tracking_uri())
    away = (f"the MLflow store {uri} stayed locked for {patience:.0f} s (another process holds it: a sqlite3 shell, "
            "a backup?)" if _sqlite_path(uri) else
            f"the MLflow tracking server {uri} did not answer for {patience:.0f} s ({short_reason(error)})")
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
            if not transient(error):
                raise
            if time.monotonic() + delay > deadline:
                raise TrackerAway(away_message(error, waiting, patience, run_id)) from None
            if delay == 1.0:
                print(f"{not_answering(error)}; trying again for up to {deadline - time.monotonic():.0f} s",
                      file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def open_client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock():  # opening a new SQLite store creates its tables: one process at a time
        return MlflowClient(uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
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
