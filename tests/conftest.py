"""Shared fixtures: the real MNIST files (../shared/mnist beside the clone, or $VAELAB_MNIST_MIRROR)."""
import os
import shutil
from pathlib import Path

import pytest

from vaelab import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    folder = Path(os.environ.get(data.MIRROR_ENV) or REPO.parent / "shared" / "mnist")
    if not all((folder / name).exists() for name in data.FILES):
        pytest.fail(f"the four MNIST files are needed in {folder} (or set {data.MIRROR_ENV})")
    return folder


@pytest.fixture(scope="session")
def mnist(mnist_dir, tmp_path_factory) -> dict[str, data.Split]:
    return data.load_mnist(tmp_path_factory.mktemp("mnist-cache"), mirror=str(mnist_dir))


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory) -> Path:
    """A folder for what a module's tests share (projects, servers, data). It is removed when the module ends
    unless one of the module's tests failed, as pytest removes a passed test's tmp_path (pyproject.toml's
    tmp_path_retention_policy): a CI machine's disk then holds one module's projects at a time, not the run's."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield folder
    if request.session.testsfailed == failed_before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def damaged_mirror(mnist_dir, tmp_path):
    """Make a copy of the MNIST folder with one file truncated or with one byte changed."""

    def damage(name: str, how: str) -> Path:
        mirror = tmp_path / "damaged-mirror"
        shutil.copytree(mnist_dir, mirror)
        victim = mirror / name
        victim.chmod(0o644)
        content = victim.read_bytes()
        middle = len(content) // 2
        changed = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]
        victim.write_bytes(content[:middle] if how == "truncated" else changed)
        return mirror

    return damage
