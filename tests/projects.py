"""Copies of this repository that end-to-end tests run as a user would: real git, DVC, MLflow and MNIST."""
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {"epochs": 3, "iwae_samples": 20}


class Project:
    """A working copy of the repository and the environment a user's shell would have there."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def run(self, *command: str, timeout: int = 1200) -> str:
        result = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def wait_for_queue(self, timeout: float = 1800) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.run("dvc", "queue", "status")
            if "Queued" not in status and "Running" not in status:
                return status
            time.sleep(3)
        raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def user_env(mnist_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without MLflow or DVC settings, with the test's Python first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        VAELAB_MNIST_MIRROR=str(mnist_dir),
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        **extra,
    )
    return env


def new_project(root: Path, env: dict[str, str], **params) -> Project:
    """This repository's files (committed and new, not ignored) in `root`, with `params` (on top of
    SMALL) in params.yaml, committed as the baseline of a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    defaults = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**defaults, **SMALL, **params}, sort_keys=False))
    project = Project(root, env)
    project.run("git", "init", "-q", "-b", "main")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "baseline")
    return project


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def http_service(command: list[str], url: str, cwd: Path, env: dict[str, str], log: Path,
                 timeout: float = 180, trusting: ssl.SSLContext | None = None) -> Iterator[str]:
    """Start a server process (output to `log`), wait until `url`/health answers (an https `url` with a certificate
    that the SSL context `trusting` verifies), stop it afterwards."""
    with open(log, "w") as output:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2, context=trusting)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
