"""MNIST fetching, verification, parsing and the validation split, on the real files."""
import shutil
import sys
import threading
import zipfile
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from vaelab import bench, data, gpu_check, literature


def test_parses_the_original_files(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist()[:3] == [5923, 6742, 5958]  # the published class counts
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert train.images.max() == 255 and train.images.min() == 0


def test_validation_split_is_seeded_and_disjoint(mnist):
    train, val = data.split_validation(mnist["train"], 5000, seed=0)
    again, val_again = data.split_validation(mnist["train"], 5000, seed=0)
    _, other = data.split_validation(mnist["train"], 5000, seed=1)
    assert len(train.labels) == 55000 and len(val.labels) == 5000
    assert torch.equal(val.images, val_again.images) and not torch.equal(val.images, other.images)
    as_rows = lambda split: {bytes(img.numpy()) for img in split.images[:2000]}
    assert not as_rows(train) & as_rows(val)


def test_fetch_from_a_mirror_folder_verifies_and_reuses(mnist_dir, tmp_path, mnist):
    sets = data.load_mnist(tmp_path / "raw", mirror=str(mnist_dir))
    cached = tmp_path / "raw" / "MNIST" / "raw"
    assert all(data.md5(cached / name) == data.md5(mnist_dir / name) for name in data.FILES)
    again = data.load_mnist(tmp_path / "raw", mirror=str(tmp_path / "nowhere"))  # verified: not fetched again
    assert torch.equal(again["test"].images, sets["test"].images)
    assert torch.equal(sets["train"].labels, mnist["train"].labels)


@contextmanager
def http_mirror(folder: Path):
    """The folder served over HTTP on 127.0.0.1, as a mirror on the internet would serve it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()


def test_a_mirror_can_be_a_url(mnist_dir, tmp_path, mnist):
    with http_mirror(mnist_dir) as url:
        over_http = data.load_mnist(tmp_path / "http", mirror=url)
    from_file_url = data.load_mnist(tmp_path / "file", mirror=mnist_dir.resolve().as_uri())
    for sets in (over_http, from_file_url):
        assert torch.equal(sets["test"].images, mnist["test"].images)


def test_a_corrupt_or_missing_file_on_a_url_mirror_is_named_in_one_line(damaged_mirror, mnist_dir, tmp_path):
    mirror = damaged_mirror("train-labels-idx1-ubyte.gz", "changed")
    with http_mirror(mirror) as url, pytest.raises(data.DataError) as error:
        data.load_mnist(tmp_path / "raw", mirror=url)
    assert str(error.value).startswith(f"MNIST file train-labels-idx1-ubyte.gz from {url}: md5 ")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "raw" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").exists()
    shutil.copyfile(mnist_dir / "train-labels-idx1-ubyte.gz", mirror / "train-labels-idx1-ubyte.gz")
    (mirror / "t10k-images-idx3-ubyte.gz").unlink()
    with http_mirror(mirror) as url, pytest.raises(data.DataError) as error:
        data.load_mnist(tmp_path / "raw2", mirror=url)
    assert "\n" not in str(error.value) and "could not be fetched from" in str(error.value)


def test_saved_test_images_hold_only_their_own_bytes(mnist, tmp_path):
    """torchvision's tensors are views into the whole file; the saved split must not carry its header."""
    assert mnist["test"].images.untyped_storage().nbytes() == 10000 * 28 * 28


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_a_corrupt_file_is_named_in_one_line_and_removed(damaged_mirror, tmp_path, damage):
    mirror = damaged_mirror("t10k-labels-idx1-ubyte.gz", damage)
    with pytest.raises(data.DataError) as error:
        data.load_mnist(tmp_path / "raw", mirror=str(mirror))
    message = str(error.value)
    assert "\n" not in message and message.startswith("MNIST file t10k-labels-idx1-ubyte.gz from ")
    assert "md5" in message and "ec29112dd5afa0611ce80d1b7f02629c" in message and "corrupt or truncated" in message
    assert not (tmp_path / "raw" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()


def test_a_missing_file_is_named_in_one_line(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.load_mnist(tmp_path / "raw", mirror=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"MNIST file train-images-idx3-ubyte.gz could not be fetched from {tmp_path}: ")


def _zip_of_another_kind(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a zip archive that PyTorch did not write")


@pytest.mark.parametrize("make, problem", [
    (lambda path: path.write_bytes(b""), "is empty"),
    (lambda path: path.mkdir(), "is a folder, not a file"),
    (lambda path: torch.save(torch.nn.Linear(2, 2), path), "holds pickled Python objects, not tensors alone"),
    (_zip_of_another_kind, "is a zip archive that PyTorch did not write"),
    (lambda path: data.save_split(data.Split(torch.zeros(3, 28, 28), torch.zeros(3, dtype=torch.int64)), path),
     "holds no MNIST images (a float32 tensor (3, 28, 28))"),
    (lambda path: data.save_split(data.Split(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.arange(3) + 8), path),
     "holds 3 images but not as many labels from 0 to 9"),
])
def test_a_split_that_is_not_one_prepare_writes_is_named_with_its_cure(tmp_path, make, problem):
    make(tmp_path / "train.pt")
    with pytest.raises(data.DamagedInput) as error:
        data.load_split(tmp_path, "train")
    path = tmp_path / "train.pt"
    assert str(error.value).startswith(f"{path} {problem}")
    assert str(error.value).endswith(f"; dvc checkout -f {path} restores it")


@pytest.mark.parametrize("tool", [bench.main, literature.main, gpu_check.main])
def test_a_tool_without_mnist_says_so_in_one_line_and_writes_nothing(tool, tmp_path, monkeypatch, capsys):
    """The benchmark, the GPU check and the literature rows run where the prepare stage has not (a GPU box, a
    fresh clone)."""
    monkeypatch.chdir(tmp_path)
    if tool is gpu_check.main:  # it asks for a GPU first, then reads the data before it touches the GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "empty"))
    arguments = ["run", "burda-vae-k1", "--out", "out.json"] if tool is literature.main else ["--out", "out.json"]
    with pytest.raises(SystemExit) as exit_:
        tool(arguments)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert error.startswith("error: MNIST file train-images-idx3-ubyte.gz could not be fetched from ")
    assert not (tmp_path / "out.json").exists()


def test_a_tool_reads_the_prepare_stages_splits_where_they_are(mnist, tmp_path):
    for name in data.SPLITS[1:]:
        data.save_split(mnist["test"], tmp_path / f"{name}.pt")
    data.save_split(mnist["train"], tmp_path / "train.pt")
    data.save_split_settings(tmp_path / data.SPLIT_SETTINGS, val_size=10000, seed=0)
    splits = data.load_or_prepare(tmp_path, val_size=10000, seed=0, raw_dir=tmp_path / "no-such-folder")
    assert torch.equal(splits["val"].images, mnist["test"].images) and len(splits["train"].labels) == 60000


@pytest.mark.parametrize("val_size, seed", [(400, 0), (5000, 1)])
def test_a_tool_splits_mnist_again_where_the_stage_split_it_otherwise(mnist_dir, tmp_path, monkeypatch, val_size,
                                                                      seed):
    """Another number of held-out images (the paper's row), or another seed's (the workspace after
    `dvc exp run -S seed=1`): the tool trains on the split its own settings make, as its record says."""
    monkeypatch.setenv(data.MIRROR_ENV, str(mnist_dir))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, split in data.prepare(tmp_path / "raw", val_size=5000, seed=0).items():
        data.save_split(split, prepared / f"{name}.pt")
    data.save_split_settings(prepared / data.SPLIT_SETTINGS, val_size=5000, seed=0)
    splits = data.load_or_prepare(prepared, val_size=val_size, seed=seed, raw_dir=tmp_path / "raw")
    expected = data.prepare(tmp_path / "raw", val_size=val_size, seed=seed)
    assert all(torch.equal(splits[name].labels, expected[name].labels) for name in data.SPLITS)
    assert not torch.equal(splits["val"].labels[:400], data.load_split(prepared, "val").labels[:400])


def test_without_torchvision_reading_mnist_is_one_error_that_says_what_to_install_or_copy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # a GPU box with PyTorch alone
    with pytest.raises(data.DataError, match=r"needs torchvision \(pip install torchvision\); without it, copy"):
        data.load_or_prepare(tmp_path, val_size=400, seed=0, raw_dir=tmp_path / "raw")
