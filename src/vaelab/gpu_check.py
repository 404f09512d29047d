"""The GPU path checked and timed in one command, on a GPU box with PyTorch alone (no MLflow, DVC or network):

    make gpu-check        # or: PYTHONPATH=src python3 -m vaelab.gpu_check [--out reports/gpu.json]

1. the CUDA cases of the tests: the hand-written step against autograd, dropout's keep rate, seeded and
   resumed training, CUDA graphs against the eager step;
2. the seed's 1000 epochs as the train stage runs them (validation and snapshots included), with the step
   replayed as CUDA graphs, against the plain PyTorch loop, the eager step and the compiled step;
3. the whole evaluation (importance-sampled bound with K = 5000 over the test set) on the GPU, and the
   same evaluation at K = 500 on the GPU and on the CPU, to show how close the two devices' numbers are.

The literature's runs (3280 epochs, K = 5000) are `make gpu-literature` (vaelab.literature).

Writes the figures with the GPU's name to `--out` after each part, so a run cut short keeps what it measured.
MNIST comes from data/prepared or data/raw (VAELAB_MNIST_MIRROR: a folder with the four files).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from vaelab import bench, data, training
from vaelab.config import Params
from vaelab.stages import atomic_file

CUDA_TESTS = ["tests/test_backprop.py", "tests/test_training.py", "-k", "cuda"]


def run_cuda_tests() -> dict:
    """pytest's verdict on the CUDA cases, and its last lines."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                         capture_output=True, text=True)
    lines = (out.stdout + out.stderr).strip().splitlines()
    print("\n".join(lines[-15:]))
    return {"exit_code": out.returncode, "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - start, 1)}


def timed_training(params: Params, splits, step_mode: str, scratch: Path) -> dict:
    train_x, val_x, test_x = (data.to_float(splits[name].images) for name in data.SPLITS)
    seconds, _, wall, _, result = bench.project_epoch_seconds(
        params, train_x, val_x, test_x[: training.SNAPSHOT_IMAGES], scratch / f"{step_mode}.db", step_mode)
    figures = {"epochs": params.epochs, "train_s": round(wall, 2), "first_epoch_s": round(seconds[0], 3),
               "s_per_epoch": round(statistics.median(seconds[1:] or seconds), 5),
               "final_val_neg_elbo": round(result.history[-1]["val_neg_elbo"], 4)}
    print(f"{step_mode}: {figures}")
    return figures, result


def compare_devices(model, splits, samples: int) -> dict:
    """The evaluation at K = `samples` on the GPU and on the CPU, and on the GPU again with another seed: the
    GPU-CPU difference of each metric, read against the second, which is the sampling noise alone."""
    gpu_s, gpu = bench.evaluation_seconds(model, splits, torch.device("cuda"), samples)
    _, other_seed = bench.evaluation_seconds(model, splits, torch.device("cuda"), samples, seed=1)
    cpu_s, cpu = bench.evaluation_seconds(model, splits, torch.device("cpu"), samples)
    rows = {key: {"gpu": gpu[key], "cpu": cpu[key], "gpu_minus_cpu": gpu[key] - cpu[key],
                  "gpu_seed_1_minus_seed_0": other_seed[key] - gpu[key]} for key in gpu}
    return {"iwae_samples": samples, "gpu_s": round(gpu_s, 2), "cpu_s": round(cpu_s, 2),
            "cpu_threads": torch.get_num_threads(), "metrics": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/gpu.json"))
    parser.add_argument("--epochs", type=int, default=1000, help="the seed's run")
    parser.add_argument("--eager-epochs", type=int, default=30)
    parser.add_argument("--compiled-epochs", type=int, default=200, help="compiling takes a minute; 200 epochs show "
                        "its rate")
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--skip", nargs="*", default=[], choices=("tests", "compiled", "devices"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU; this check is for a GPU machine")
    try:
        splits = data.load_or_prepare(Path("data/prepared"), Params().val_size, Params().seed)
    except data.DataError as error:
        parser.exit(2, f"error: {error}\n")

    device = torch.device("cuda")
    report = {}
    report.update({"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "command": "make gpu-check"})

    def save(key, value):
        report[key] = value
        with atomic_file(args.out) as path:  # a kill mid-write leaves the parts recorded before it
            path.write_text(json.dumps(report, indent=2) + "\n")

    def attempt(key, work):
        """Run one part; a failure is recorded under `key` and the other parts still run."""
        try:
            return work()
        except Exception as error:  # noqa: BLE001 (one part's failure must not hide the others' figures)
            traceback.print_exc()
            save(key, {"error": f"{type(error).__name__}: {error}"})
            return None

    print(f"{report['gpu']}, torch {report['torch']}, CUDA {report['cuda']}")
    if "tests" not in args.skip:
        save("tests", run_cuda_tests())
    save("matmul_gflops", round(bench.matmul_gflops(device), 1))
    params = Params(device="cuda", epochs=args.epochs)
    baseline_x = data.to_float(splits["train"].images).to(device)
    baseline = bench.baseline_epoch_seconds(params, baseline_x, args.baseline_epochs)
    base_s = statistics.median(baseline[1:])
    save("plain_loop", {"epochs": args.baseline_epochs, "s_per_epoch": round(base_s, 5),
                        "seed_run_s_at_this_rate": round(base_s * args.epochs, 1)})
    del baseline_x
    print(f"plain loop: {base_s:.4f} s/epoch")

    modes, result = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        for mode, epochs in (("eager", args.eager_epochs), ("graphs", args.epochs),
                             ("compiled-graphs", args.compiled_epochs)):
            if mode == "compiled-graphs" and "compiled" in args.skip:
                continue
            timed = attempt(f"train_{mode}", lambda: timed_training(Params(device="cuda", epochs=epochs), splits,
                                                                    mode, Path(scratch)))
            if timed:
                modes[mode] = {**timed[0], "ratio_to_plain_loop": round(timed[0]["s_per_epoch"] / base_s, 3)}
                result = timed[1] if mode == "graphs" or result is None else result
                save("train", modes)

    seconds, results = bench.evaluation_seconds(result.model, splits, device, args.iwae_samples)
    save("evaluate", {"iwae_samples": args.iwae_samples, "seconds": round(seconds, 2),
                      "test_iwae_nll": results["test_iwae_nll"], "test_neg_elbo": results["test_neg_elbo"]})
    print(f"evaluate, K = {args.iwae_samples}: {seconds:.1f} s, -log p(x) {results['test_iwae_nll']:.4f}")
    if "devices" not in args.skip:
        attempt("gpu_against_cpu", lambda: save("gpu_against_cpu", compare_devices(result.model, splits, 500)))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
