"""The benchmark's FLOP count, which its GFLOP/s figure rests on, against PyTorch's own counter; its arguments."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vaelab import gpu_check
from vaelab.bench import (MATMUL_KERNELS, decoder_products, evaluation_floor_seconds, main, matmul_floor_seconds,
                          step_products, training_gflop_per_epoch)
from vaelab.data import SPLIT_SETTINGS, load_mnist, save_split_settings
from vaelab.model import VAE, ModelConfig, negative_elbo


def test_flop_count_matches_pytorchs_counter_for_one_training_step():
    model = VAE(ModelConfig(latent_dim=8)).train()
    x = torch.rand(100, 784)
    with FlopCounterMode(display=False) as counter:
        logits, mean, log_var = model(x)
        negative_elbo(logits, x, mean, log_var)[0].mean().backward()
    assert counter.get_total_flops() == training_gflop_per_epoch(8, 100) * 1e9


@pytest.mark.parametrize("arguments, message", [
    (["--rounds", "0"], "--rounds: '0' is not a whole number of at least 1"),
    (["--epochs", "two"], "--epochs: 'two' is not a whole number of at least 1"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_exit_2_naming_the_problem_and_write_nothing(tmp_path, capsys, arguments, message):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_:
        main([*arguments, "--out", str(out)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("damage, problem", [
    ("prepared", "data/prepared/train.pt is not a PyTorch archive; dvc checkout -f data/prepared/train.pt restores it"),
    ("unpacked", "could not be read (shape '[60000, 28, 28]' is invalid for input of size 23519992); delete that "
                 "folder (a download cache) and run again"),
])
@pytest.mark.parametrize("tool", [main, gpu_check.main], ids=["bench", "gpu-check"])
def test_a_damaged_input_is_one_line_naming_it_and_its_cure(tmp_path, monkeypatch, capsys, mnist_dir, damage, problem,
                                                           tool):
    """The splits the prepare stage wrote, or torchvision's unpacked copies of MNIST that it splits again, for
    `make bench` and `make gpu-check` (which asks for a GPU first, then reads the data before it touches it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: tool is gpu_check.main)
    if damage == "prepared":
        prepared = tmp_path / "data" / "prepared"
        prepared.mkdir(parents=True)
        save_split_settings(prepared / SPLIT_SETTINGS, val_size=5000, seed=0)
        (prepared / "train.pt").write_text("<html>")
    else:
        load_mnist(tmp_path / "data" / "raw", mirror=str(mnist_dir))
        unpacked = tmp_path / "data" / "raw" / "MNIST" / "raw" / "train-images-idx3-ubyte"
        unpacked.write_bytes(unpacked.read_bytes()[:23519992 + 16])
    with pytest.raises(SystemExit) as exit_:
        tool(["--out", str(tmp_path / "bench.json")])
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.startswith("error: ") and line.endswith(problem)
    assert not (tmp_path / "bench.json").exists()


def test_the_steps_products_are_the_counted_flops_and_each_kernel_computes_the_same_product():
    products = step_products(latent_dim=8, batch=100)
    assert 2 * sum(m * k * n for m, k, n in products) == training_gflop_per_epoch(8, 100) * 1e9
    a, b = torch.randn(100, 784), torch.randn(784, 256)
    for name, product in MATMUL_KERNELS.items():
        torch.testing.assert_close(product(a, b), a @ b, rtol=1e-4, atol=1e-3, msg=name)
    floor = matmul_floor_seconds(latent_dim=2, batch=500, images=1000, repeats=2)
    assert set(floor) == {*MATMUL_KERNELS, "fastest per product"}
    assert 0 < floor["fastest per product"] <= min(floor[name] for name in MATMUL_KERNELS)


def test_the_bounds_floor_counts_the_decoders_products():
    model = VAE(ModelConfig(latent_dim=3)).eval()
    with FlopCounterMode(display=False) as counter:
        model.decoder(torch.randn(50, 3))
    assert counter.get_total_flops() == 2 * sum(m * k * n for m, k, n in decoder_products(3, 50))
    one, two = (evaluation_floor_seconds(latent_dim=2, images=images, samples=1, repeats=1) for images in (4096, 8192))
    assert set(one) == set(two) == {*MATMUL_KERNELS, "fastest per product"} and all(v > 0 for v in one.values())


def test_the_images_are_timed_in_a_store_of_their_own_whatever_mlflows_default(mnist, tmp_path, monkeypatch):
    """The benchmark's train stage runs set MLflow's default store first; the images go to their own all the same."""
    import mlflow

    from vaelab import training
    from vaelab.bench import images_seconds
    from vaelab.config import Params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pixels = mnist["test"].images[:400].reshape(-1, 784).float() / 255
    result = training.train(Params(epochs=2, batch_size=100, device="cpu"), pixels[:300], pixels[300:], pixels[:200])
    (tmp_path / "scratch").mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        timed = images_seconds(result, mnist["test"].labels[:200], pixels, [0, 1, 2], tmp_path / "scratch")
    finally:
        mlflow.set_tracking_uri(None)  # unset again, as the other tests expect
    assert timed["steps"] == 3 and timed["seconds"] > 0 and 0 < timed["megabytes"] < 1
    assert not (tmp_path / "other.db").exists()  # MLflow's default store untouched
