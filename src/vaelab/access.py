"""Before any work: whether the tracking server answers, knows the user, and lets them write to the experiment
(MLflow's auth app, `mlflow server --app-name basic-auth`). Every request goes through MLflow's own HTTP client
with the credentials and TLS settings its tracking client uses (MLFLOW_TRACKING_USERNAME and _PASSWORD or
~/.mlflow/credentials, _TOKEN, _SERVER_CERT_PATH, _INSECURE_TLS, _CLIENT_CERT_PATH, ...): a server that MLflow
reaches, this check reaches too."""
from __future__ import annotations

import os

from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from requests import Response

from vaelab.stages import StageError
from vaelab.store import (
    EXPERIMENT_NAME,
    REACHABLE_TIMEOUT_S,
    AccessRefused,
    patience_seconds,
    patiently,
    redacted,
    refusal_message,
    refusal_of,
    short_reason,
    tracking_uri,
    tracking_user,
)

WRITE_PERMISSIONS = ("EDIT", "MANAGE")  # MLflow's auth app: READ reads, EDIT logs runs, MANAGE also grants
# MLflow's routes (the auth app's from mlflow/server/auth/routes.py, which is not imported: it loads the server)
GET_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
GET_USER_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
GET_CURRENT_USER = "/api/2.0/mlflow/users/current"


def check_access(write: bool, patient: bool = False, experiment: str | None = None) -> None:
    """Fail within seconds, before any work, when an HTTP tracking server does not answer (most likely a wrong
    address), presents a certificate that MLflow's client does not trust, refuses the user's name or password
    (401), or, with `write`, does not let the user write to the experiment (an authenticating server:
    `mlflow server --app-name basic-auth`): one line each, never retried. `patient` stages (those after `train`,
    whose server answered before) wait for an answer as `patiently` does, for a server that is restarting."""
    patience_seconds()  # a bad value is named now, not when a stage ends
    if not tracking_uri().startswith(("http://", "https://")):
        return

    def probe() -> None:
        _get("/health").raise_for_status()  # requests' HTTPError, an OSError: a restarting server's 503 is waited on

    try:
        if patient:
            patiently(probe, "the stage's start", None)
        else:
            probe()
    except (MlflowException, OSError) as error:
        raise refusal_of(error) or _silent(error) from None
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)
    status, found = _server_get(GET_EXPERIMENT_BY_NAME, experiment_name=experiment)
    if status in (401, 403):
        raise AccessRefused(refusal_message(status, experiment, "read"))
    if write and status == 200 and (refusal := write_refusal(found["experiment"]["experiment_id"], experiment)):
        raise AccessRefused(refusal)


def _get(endpoint: str, **params: str) -> Response:
    """GET `endpoint` on the tracking server as MLflow's tracking client sends a request, tried once and given
    REACHABLE_TIMEOUT_S, not MLflow's retries: a server that does not answer is named within seconds."""
    try:
        credentials = get_default_host_creds(tracking_uri())
    except MlflowException as contradiction:  # MLFLOW_TRACKING_INSECURE_TLS beside _SERVER_CERT_PATH
        raise StageError(contradiction.message) from None
    return http_request(credentials, endpoint, "GET", params=params, max_retries=0, timeout=REACHABLE_TIMEOUT_S,
                        raise_on_status=False)


def _server_get(endpoint: str, **params: str) -> tuple[int, dict]:
    """The status and the JSON answer ({} when there is none) of a GET to the server."""
    try:
        answer = _get(endpoint, **params)
    except MlflowException as error:
        raise refusal_of(error) or _silent(error) from None
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return answer.status_code, {}


def _silent(error: BaseException) -> StageError:
    """The one line for a server that does not answer at the start: most likely a wrong address."""
    return StageError(f"the MLflow tracking server {redacted(tracking_uri())} does not answer "
                      f"({short_reason(error)}); start it or point MLFLOW_TRACKING_URI elsewhere")


def write_refusal(experiment_id: str, experiment: str) -> str | None:
    """Why the user may not write to the experiment, in one line, or None if they may (or the server checks no
    permissions: it has no auth app, whose permission route is then missing)."""
    if not tracking_uri().startswith(("http://", "https://")):
        return None
    status, permission = _server_get(GET_USER_PERMISSION, username=tracking_user() or "",
                                     resource_type="experiment", resource_id=experiment_id)
    if status != 200 or permission.get("permission") in WRITE_PERMISSIONS:
        return None
    if _server_get(GET_CURRENT_USER)[1].get("user", {}).get("is_admin"):
        return None
    return refusal_message(403, experiment, "write to", permission.get("permission", "none"))
