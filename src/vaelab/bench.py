"""Benchmark: the project's training epoch against a straightforward PyTorch loop, in one run.

    python -m vaelab.bench [--device auto] [--rounds 3] [--epochs 3] [--baseline-epochs N] [--iwae-samples K]
                           [--out reports/bench.json]

The baseline is what a user would write: the same model, in-memory tensors, nn.Dropout, autograd and the
default torch.optim.Adam. The project's epoch is timed as the train stage runs it: validation, snapshots
and MLflow logging (to a throwaway SQLite store) included. Both are timed in alternating rounds and the
medians reported, since a shared machine's speed drifts. Each round also times the epoch of each other network
and objective (`VARIANTS`: the conditional VAE, IWAE and "VAE, k" through autograd, Burda et al.'s network), as
the train stage runs them, each over the seed's (`variants`), and k = 5 against k = 1. Both run under the train
stage's allocator setting
(`training.reuse_freed_memory`), so that the ratio does not credit the stage with it. Where MLflow is not
installed (a bare GPU box with torch alone), the project's epochs are timed without logging and the report
says so. Then the evaluate stage (K = --iwae-samples) and the render stage are timed once, and on a CPU the
report gives the floor of an epoch and of the importance-sampled bound: their matrix products alone, with
each fp32 kernel.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vaelab import data, metrics, training
from vaelab.config import Params
from vaelab.model import IMAGE_PIXELS, SEED_LOSS_SCALE, VAE, ModelConfig, linear, matmul_kernel, resolve_device
from vaelab.stages import atomic_file

HIDDEN = (256, 128)  # the seed's layer widths, encoder order; the decoder mirrors them
# the other trainings timed beside the seed's in each round: name -> how their params differ from the seed's
VARIANTS = {
    "conditional": dict(conditional=True),
    "seed_iwae_k1": dict(objective="iwae"),  # the seed's network through autograd: the hand-written step's gain
    "seed_iwae_k5": dict(objective="iwae", train_samples=5),
    "burda_elbo_k1": dict(architecture="burda", dropout=0.0),
    "burda_iwae_k1": dict(architecture="burda", dropout=0.0, objective="iwae"),
    "burda_iwae_k5": dict(architecture="burda", dropout=0.0, objective="iwae", train_samples=5),
}


def processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """The device's float32 matrix-multiply rate (TF32 as PyTorch's settings allow): the median of
    `repeats` size^3 products."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def step_products(latent_dim: int, batch: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of every matrix product of one training step: for each layer the forward product, the
    weight gradient and (except the first layer) the input gradient."""
    layers = [(IMAGE_PIXELS, HIDDEN[0]), (HIDDEN[0], HIDDEN[1]), (HIDDEN[1], 2 * latent_dim),
              (latent_dim, HIDDEN[1]), (HIDDEN[1], HIDDEN[0]), (HIDDEN[0], IMAGE_PIXELS)]
    products = []
    for i, (n_in, n_out) in enumerate(layers):
        products += [(batch, n_in, n_out), (n_out, batch, n_in)] + ([(batch, n_out, n_in)] if i else [])
    return products


def training_gflop_per_epoch(latent_dim: int, images: int) -> float:
    """Matrix-product FLOPs of one epoch (`step_products` over all its images)."""
    return 2 * sum(m * k * n for m, k, n in step_products(latent_dim, 1)) * images / 1e9


def decoder_products(latent_dim: int, rows: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of the matrix products that decode `rows` latents in eval mode."""
    return [(rows, latent_dim, HIDDEN[1]), (rows, HIDDEN[1], HIDDEN[0]), (rows, HIDDEN[0], IMAGE_PIXELS)]


MATMUL_KERNELS = {  # a (m, k) times b (k, n) with each fp32 kernel of `vaelab.model.linear` on a CPU
    "torch.mm (MKL)": lambda a, b: linear(a, b.t(), kernel="mm"),
    "oneDNN linear": lambda a, b: linear(a, b.t(), kernel="onednn"),
}


def matmul_floor_seconds(latent_dim: int, batch: int, images: int, repeats: int = 20) -> dict[str, float]:
    """Seconds per epoch that the step's matrix products alone take with each fp32 kernel PyTorch offers on
    this CPU, and with the fastest kernel for each product: the epoch's floor at this machine's rates."""
    return products_seconds(step_products(latent_dim, batch), images / batch, repeats)


def evaluation_floor_seconds(latent_dim: int, images: int, samples: int, repeats: int = 5) -> dict[str, float]:
    """The same floor for the importance-sampled bound with K = `samples` over `images`: its decoder's
    products, in the blocks of `metrics.DECODE_BLOCK_ROWS` samples that it decodes at a time on a CPU."""
    block = metrics.DECODE_BLOCK_ROWS
    return products_seconds(decoder_products(latent_dim, block), images * samples / block, repeats)


def products_seconds(products: list[tuple[int, int, int]], rounds: float, repeats: int) -> dict[str, float]:
    """Seconds that `rounds` rounds of the matrix products `products` take with each kernel, and with the
    fastest kernel for each product: the median of `repeats` timings of each."""
    floors = {name: 0.0 for name in MATMUL_KERNELS} | {"fastest per product": 0.0}
    for m, k, n in products:
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = {}
        for name, product in MATMUL_KERNELS.items():
            product(a, b)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                product(a, b)
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times)
        for name, value in seconds.items():
            floors[name] += value
        floors["fastest per product"] += min(seconds.values())
    return {name: round(value * rounds, 4) for name, value in floors.items()}


def baseline_epoch_seconds(params: Params, images: torch.Tensor, epochs: int) -> list[float]:
    """The straightforward loop: autograd through the nn.Module, default Adam, shuffled in-memory batches."""
    torch.manual_seed(params.seed)
    device = images.device
    model = VAE(ModelConfig(params.latent_dim, params.dropout)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        for index in torch.randperm(len(images), device=device).split(params.batch_size):
            x = images[index]
            logits, mean, log_var = model(x)
            reconstruction = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
            kl = -0.5 * torch.sum(1 + log_var - mean.square() - log_var.exp(), dim=1)
            loss = (reconstruction.sum(dim=1) + kl).mean() / SEED_LOSS_SCALE
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _training_run(params: Params, store: Path):
    """The train stage's MLflow run on a throwaway store, or None where MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        return None
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    from vaelab import tracking

    return tracking.TrainingRun(params)


def project_epoch_seconds(params: Params, train_x, val_x, snapshot_x, store: Path, step_mode: str | None = None,
                          labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Epoch times of `training.train` with the train stage's MLflow logging, the logging's share of the
    wall time (None without MLflow), the whole training's wall time, its page faults per epoch (a fault maps
    a fresh page of memory), and its result. Each epoch ends with the validation loss read back to the host,
    so the stamps include all of the device's work."""
    run = _training_run(params, store)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    stamps, logging = [time.perf_counter()], [0.0]

    def on_epoch(row):
        start = time.perf_counter()
        if run is not None:
            run.log_epoch(row)
        logging[0] += time.perf_counter() - start
        stamps.append(time.perf_counter())

    result = training.train(params, train_x, val_x, snapshot_x, on_epoch=on_epoch, step_mode=step_mode,
                            labels=labels)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / params.epochs
    start = time.perf_counter()
    if run is not None:
        run.end("FINISHED")
    logging[0] += time.perf_counter() - start
    wall = time.perf_counter() - stamps[0]
    share = logging[0] / wall if run is not None else None
    return [b - a for a, b in zip(stamps, stamps[1:])], share, wall, faults, result


def evaluation_seconds(model: VAE, splits: dict[str, data.Split], device: torch.device, samples: int,
                       seed: int = 0) -> tuple[float, dict[str, float]]:
    """The evaluate stage's work (grayscale test set, K = `samples`) on `device`: its seconds and results.
    The model is left on the CPU."""
    test_x, train_x = (data.to_float(splits[name].images).to(device) for name in ("test", "train"))
    test_labels, train_labels = (splits[name].labels.to(device) for name in ("test", "train"))
    model.to(device)
    synchronize(device)
    start = time.perf_counter()
    results = metrics.test_results(model, test_x, test_labels, train_x, train_labels, seed, samples)
    synchronize(device)
    seconds = time.perf_counter() - start
    model.cpu()
    return seconds, results


def render_seconds(result, labels: torch.Tensor, test_x: torch.Tensor, frames: int, folder: Path) -> float:
    """The render stage's figures, with the animation length of a default run."""
    from vaelab import figures  # matplotlib: imported only here, so the rest runs with PyTorch alone

    snapshots = result.snapshots
    manifolds = torch.stack((snapshots.manifolds * frames)[:frames]).numpy()
    means = torch.stack((snapshots.latent_means * frames)[:frames]).numpy()
    epochs = list(range(1, frames + 1))
    start = time.perf_counter()
    digits = test_x[:10]
    figures.reconstructions(digits.reshape(-1, 28, 28).numpy(), metrics.reconstruct(result.model, digits).numpy(),
                            folder / "reconstructions.png")
    figures.manifold(manifolds[-1], epochs[-1], result.model.config.latent_dim, folder / "manifold.png")
    figures.manifold_animation(manifolds, epochs, folder / "manifold.gif")
    figures.latent_scatter(means[-1], labels.numpy(), epochs[-1], folder / "latent_scatter.png")
    figures.latent_scatter_animation(means, labels.numpy(), epochs, folder / "latent_scatter.gif")
    figures.learning_curves(result.history, folder / "learning_curves.png")
    return time.perf_counter() - start


def images_seconds(result, labels: torch.Tensor, test_x: torch.Tensor, epochs: list[int], folder: Path) -> dict:
    """The render stage's MLflow images (`handoff.add_to_run`) of a default run's snapshots, into a SQLite store of
    their own: the seconds to draw and log them, and the megabytes they add to the run's artifacts."""
    from vaelab import figures, handoff, store

    snapshots, frames, folder = result.snapshots, len(epochs), folder / "images"
    folder.mkdir()
    grids, means, decoded = (torch.stack((getattr(snapshots, name) * frames)[:frames]).numpy()
                             for name in ("manifolds", "latent_means", "reconstructions"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'images.db'}"
    try:
        client = store.open_client()  # this store, whatever the process's MLflow default is by now
        run_id = client.create_run(store.get_or_create_experiment(client, "bench")).info.run_id
        handoff.write_run_id(folder / "run.json", run_id)
        start = time.perf_counter()
        originals = (test_x[:metrics.RECONSTRUCTED_DIGITS].reshape(-1, 28, 28) * 255).round().to(torch.uint8).numpy()
        images = figures.snapshot_pictures(epochs, grids, means, labels.numpy(), originals, decoded,
                                           handoff.image_steps(frames))
        handoff.add_to_run(folder / "run.json", "the images", images=images)
        seconds = time.perf_counter() - start
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    size = sum(path.stat().st_size for path in (folder / store.ARTIFACT_DIR).rglob("*") if path.is_file())
    steps = len(images["figures/manifold"])
    return {"steps": steps, "seconds": round(seconds, 2), "megabytes": round(size / 1e6, 2)}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_positive, default=3, help="alternating baseline/project rounds")
    parser.add_argument("--epochs", type=_positive, default=3, help="the project's epochs per round")
    parser.add_argument("--baseline-epochs", type=_positive, help="the baseline's epochs per round (default: --epochs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iwae-samples", type=_positive, default=Params().iwae_samples,
                        help="K of the evaluate stage's importance-sampled bound (default: params' %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU; use auto or cpu")

    device = resolve_device(args.device)
    params = Params(device=device.type, epochs=args.epochs)
    training.reuse_freed_memory()
    try:
        splits = data.load_or_prepare(args.data, params.val_size, params.seed)
    except data.DataError as error:
        parser.exit(2, f"error: {error}\n")
    train_x, val_x, test_x = (data.to_float(splits[name].images) for name in data.SPLITS)
    snapshot = slice(0, training.SNAPSHOT_IMAGES)
    print(f"{processor_name(device)}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    peak = matmul_gflops(device)
    print(f"matrix multiply: {peak:.0f} GFLOP/s")
    on_cpu = device.type == "cpu"
    floor = matmul_floor_seconds(params.latent_dim, params.batch_size, len(train_x)) if on_cpu else None
    print(f"an epoch's matrix products alone, s: {floor}; the step multiplies with {matmul_kernel(device)}")
    evaluate_floor = evaluation_floor_seconds(params.latent_dim, len(test_x), args.iwae_samples) if on_cpu else None
    print(f"the importance-sampled bound's matrix products alone (K = {args.iwae_samples}), s: {evaluate_floor}")

    labels = tuple(splits[name].labels for name in ("train", "val")) + (splits["test"].labels[snapshot],)
    baseline_x = train_x.to(device)  # the plain loop's data set, on the device once for every round
    baseline, project, logging_share, faults = [], [], [], []
    variants = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            baseline += baseline_epoch_seconds(params, baseline_x, args.baseline_epochs or args.epochs)
            seconds, share, train_wall, epoch_faults, result = project_epoch_seconds(
                params, train_x, val_x, test_x[snapshot], Path(scratch) / "mlflow.db")
            project += seconds
            faults.append(epoch_faults)
            logging_share.append(share)
            for name, changes in VARIANTS.items():
                variants[name] += project_epoch_seconds(dataclasses.replace(params, **changes), train_x, val_x,
                                                        test_x[snapshot], Path(scratch) / "mlflow.db", labels=labels)[0]
            print(f"round {round_ + 1}: baseline {statistics.median(baseline):.3f} s/epoch, "
                  f"project {statistics.median(project):.3f} s/epoch, "
                  + ", ".join(f"{name} {statistics.median(s):.3f}" for name, s in variants.items()))
        evaluate, _ = evaluation_seconds(result.model, splits, device, args.iwae_samples)
        frames = len(training.snapshot_epochs(Params().epochs))
        try:
            render = render_seconds(result, splits["test"].labels[snapshot], test_x, frames, Path(scratch))
            images = images_seconds(result, splits["test"].labels[snapshot], test_x,
                                    [0, *training.snapshot_epochs(Params().epochs)], Path(scratch))
        except ImportError as missing:  # a bare GPU box without matplotlib or MLflow
            print(f"render not timed: {missing}")
            render = images = None

    gflop = training_gflop_per_epoch(params.latent_dim, len(train_x))
    base_s, proj_s = statistics.median(baseline), statistics.median(project)
    report = {
        "machine": {"processor": processor_name(device), "device": device.type, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "matmul_gflops": round(peak, 1),
                    "matmul_kernel": matmul_kernel(device)},
        "images_per_epoch": len(train_x),
        "project_epochs_per_round": args.epochs,
        "project_train_s": round(train_wall, 2),
        "baseline_s_per_epoch": round(base_s, 4),
        "project_s_per_epoch": round(proj_s, 4),
        "ratio": round(proj_s / base_s, 3),
        "variants": {name: {"s_per_epoch": round(statistics.median(s), 4),
                            "over_project": round(statistics.median(s) / proj_s, 3)} for name, s in variants.items()},
        "k5_over_k1": {network: round(statistics.median(variants[f"{network}_iwae_k5"])
                                      / statistics.median(variants[f"{network}_iwae_k1"]), 3)
                       for network in ("seed", "burda")},
        "project_images_per_s": round(len(train_x) / proj_s),
        "baseline_images_per_s": round(len(train_x) / base_s),
        "gflop_per_epoch": round(gflop, 1),
        "project_gflops": round(gflop / proj_s, 1),
        "project_fraction_of_matmul_peak": round(gflop / proj_s / peak, 3),
        "matmul_floor_s_per_epoch": floor,
        "project_fraction_of_floor": None if floor is None else round(min(floor.values()) / proj_s, 3),
        "project_page_faults_per_epoch": round(statistics.median(faults)),
        "mlflow_logging_share": None if None in logging_share else round(max(logging_share), 4),
        "evaluate_iwae_samples": args.iwae_samples,
        "evaluate_s": round(evaluate, 3),
        "evaluate_matmul_floor_s": evaluate_floor,
        "evaluate_over_floor": None if evaluate_floor is None else round(evaluate / min(evaluate_floor.values()), 2),
        "render_s": None if render is None else round(render, 2),
        "render_frames": frames,
        # the run's MLflow images (snapshots and epoch 0) against the default run's training, its epochs at this rate
        "mlflow_images": images and {**images, "share_of_train": round(images["seconds"] / (proj_s * Params().epochs),
                                                                       4)},
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    with atomic_file(args.out) as path:
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
