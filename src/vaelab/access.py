"""Before any work: whether the tracking server answers, knows the user, and lets them write to the experiment
(MLflow's auth app, `mlflow server --app-name basic-auth`)."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request

from vaelab.stages import StageError
from vaelab.store import (
    EXPERIMENT_NAME,
    REACHABLE_TIMEOUT_S,
    AccessRefused,
    patience_seconds,
    patiently,
    redacted,
    refusal_message,
    tracking_uri,
    tracking_user,
)

WRITE_PERMISSIONS = ("EDIT", "MANAGE")  # MLflow's auth app: READ reads, EDIT logs runs, MANAGE also grants


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
        raise _silent(error) from None
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
    status, found = _server_get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    if status in (401, 403):
        raise AccessRefused(refusal_message(status, experiment, "read"))
    if write and status == 200 and (refusal := write_refusal(found["experiment"]["experiment_id"], experiment)):
        raise AccessRefused(refusal)


def _server_get(path: str, **query: str) -> tuple[int, dict]:
    """GET `path` on the tracking server as the user MLflow's client would send (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, HTTP basic authentication): the status and the JSON answer ({} when there is none)."""
    request = urllib.request.Request(f"{tracking_uri().rstrip('/')}{path}?{urllib.parse.urlencode(query)}")
    if tracking_user() is not None:
        credentials = f"{tracking_user()}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    try:
        with urllib.request.urlopen(request, timeout=REACHABLE_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as refused:
        return refused.code, {}
    except (OSError, ValueError) as error:
        raise _silent(error) from None


def _silent(error: BaseException) -> StageError:
    """The one line for a server that does not answer at the start: most likely a wrong address."""
    return StageError(f"the MLflow tracking server {redacted(tracking_uri())} does not answer ({error}); "
                      "start it or point MLFLOW_TRACKING_URI elsewhere")


def write_refusal(experiment_id: str, experiment: str) -> str | None:
    """Why the user may not write to the experiment, in one line, or None if they may (or the server checks no
    permissions: it has no auth app, whose permission route is then missing)."""
    if not tracking_uri().startswith(("http://", "https://")):
        return None
    status, permission = _server_get("/api/3.0/mlflow/users/permissions/get", username=tracking_user() or "",
                                     resource_type="experiment", resource_id=experiment_id)
    if status != 200 or permission.get("permission") in WRITE_PERMISSIONS:
        return None
    if _server_get("/api/2.0/mlflow/users/current")[1].get("user", {}).get("is_admin"):
        return None
    return refusal_message(403, experiment, "write to", permission.get("permission", "none"))
