"""A team server that lets in only its team: a real `mlflow server --app-name basic-auth` on loopback, with an
admin, a trainer (EDIT on the experiment) and a reader (READ) created through MLflow's own auth client. The
trainer trains; a reader's training and a wrong password are refused in one line before any work; a reader
compares; no password is stored or printed anywhere."""
import hashlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from projects import Project, free_port, http_service, new_project, user_env

pytestmark = pytest.mark.e2e
# drawn afresh, so that finding one in a file means the project wrote it there (this file is in the project too)
PASSWORDS = {user: f"{user}-{secrets.token_hex(8)}" for user in ("admin", "trainer", "reader")}
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{folder}/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@pytest.fixture(scope="module")
def server(module_tmp_path, mnist_dir):
    """The server as the README starts it: the admin password and the CSRF secret from the environment."""
    folder = module_tmp_path / "server"
    folder.mkdir()
    (folder / "auth.ini").write_text(AUTH_INI.format(folder=folder))
    port = free_port()
    env = user_env(mnist_dir, MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"),
                   MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORDS["admin"], MLFLOW_FLASK_SERVER_SECRET_KEY="csrf-" + "x" * 20)
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    with http_service(command, f"http://127.0.0.1:{port}", folder, env, folder / "server.log") as url:
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORDS["admin"]}
        saved = {k: os.environ.get(k) for k in admin}
        os.environ.update(admin)  # MLflow's clients read the credentials from the environment
        try:
            auth = get_app_client("basic-auth", tracking_uri=url)
            experiment_id = MlflowClient(url).create_experiment("vaelab")
            for user, permission in (("trainer", "EDIT"), ("reader", "READ")):
                auth.create_user(user, PASSWORDS[user])
                auth.grant_user_permission(user, "experiment", experiment_id, permission)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        yield {"url": url, "folder": folder, "experiment_id": experiment_id}


def _as(project: Project, server: dict, user: str, password: str | None = None) -> Project:
    return Project(project.root, dict(project.env, MLFLOW_TRACKING_URI=server["url"], MLFLOW_TRACKING_USERNAME=user,
                                      MLFLOW_TRACKING_PASSWORD=password or PASSWORDS[user],
                                      VAELAB_TRACKING_PATIENCE_SECONDS="600"))


def _runs(server: dict) -> list:
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORDS["admin"])
    try:
        return MlflowClient(server["url"]).search_runs([server["experiment_id"]])
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


@pytest.fixture(scope="module")
def trained(server, module_tmp_path, mnist_dir):
    project = new_project(module_tmp_path / "project", user_env(mnist_dir), epochs=1)
    _as(project, server, "trainer").run("dvc", "repro")
    return project


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_trainer_trains_and_logs_to_the_team_server(server, trained):
    [run] = _runs(server)
    assert run.info.status == "FINISHED" and "test/iwae_nll" in run.data.metrics
    assert run.info.run_id in (trained / "models" / "run.json").read_text()


@pytest.mark.parametrize("user, password, refusal", [
    ("reader", None, "error: user 'reader' may not write to experiment 'vaelab' on the MLflow tracking server "
                     "http://127.0.0.1:{port} (it holds READ); ask the server's admin for EDIT permission on it"),
    ("trainer", "not-the-password", "error: the MLflow tracking server http://127.0.0.1:{port} refused user "
                                    "'trainer': the user name or password is wrong (MLFLOW_TRACKING_USERNAME, "
                                    "MLFLOW_TRACKING_PASSWORD)"),
])
def test_a_refused_user_is_told_in_one_line_before_any_training(server, trained, user, password, refusal):
    before = {run.info.run_id for run in _runs(server)}
    model = _md5(trained / "models" / "vae.pt")
    started = time.monotonic()
    result = subprocess.run(["dvc", "repro", "-f", "train"], cwd=trained.root,
                            env=_as(trained, server, user, password).env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert refusal.format(port=server["url"].rsplit(":", 1)[1]) in output.splitlines()
    assert "epoch" not in output and time.monotonic() - started < 120  # refused at once, not waited on
    assert not any(secret in output for secret in [*PASSWORDS.values(), "not-the-password"])
    assert {run.info.run_id for run in _runs(server)} == before  # no run created
    assert not list((trained / ".vaelab" / "checkpoints").glob("*/state.pt"))
    trained.run("dvc", "checkout", "models")  # the previous outputs are still in DVC's cache
    assert _md5(trained / "models" / "vae.pt") == model


def test_a_reader_compares_and_is_told_the_comparison_was_not_logged(server, trained):
    result = subprocess.run(["vaelab", "compare"], cwd=trained.root, env=_as(trained, server, "reader").env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "1 runs compared" in result.stdout
    assert (trained / "reports" / "compare" / "groups.md").exists()
    assert ("the comparison run was not logged: user 'reader' may not write to experiment 'vaelab'"
            in result.stderr)
    assert all(run.data.tags.get("vaelab.kind") != "comparison" for run in _runs(server))


def test_no_password_is_stored_or_printed_anywhere(server, trained):
    subprocess.run(["dvc", "repro"], cwd=trained.root, env=_as(trained, server, "trainer").env, check=True,
                   capture_output=True)
    places = [p for root in (trained.root, server["folder"] / "artifacts") for p in root.rglob("*") if p.is_file()]
    places.append(server["folder"] / "mlflow.db")
    assert len(places) > 20
    for path in places:
        content = path.read_bytes()
        for password in PASSWORDS.values():
            assert password.encode() not in content, f"a password in {path}"
    for run in _runs(server):
        logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert not any(password in logged for password in PASSWORDS.values())
