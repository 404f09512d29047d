"""The cluster's overhead, measured (`make bench-slurm`, docs/cluster.md): a grid submitted with `vaelab slurm` to a
real one-machine Slurm (slurm_cluster.py) logging to a loopback MLflow server, then `vaelab slurm timings`.
Default: one point of the default parameters (200 epochs) on one node with all this machine's cores.

usage: python tests/slurm_bench.py [-S PARAM=VALUES ...] [--cpus N]   (needs root, slurm-wlm and munge)"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from vaelab.bench import processor_name

sys.path.insert(0, str(Path(__file__).parent))
from projects import free_port, http_service, new_project, user_env  # noqa: E402
from slurm_cluster import missing, slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"epochs": 200, "iwae_samples": 500}  # params.yaml's, undoing the tests' SMALL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", action="append", default=[], dest="points")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if reason := missing():
        sys.exit(f"error: {reason}")
    mnist = Path(os.environ.get("VAELAB_MNIST_MIRROR") or REPO.parent / "shared" / "mnist")
    with tempfile.TemporaryDirectory(prefix="vaelab-slurm-bench-") as folder:
        folder = Path(folder)
        port = free_port()
        server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                  "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
        with slurm_cluster(folder / "slurm", cpus_per_node=args.cpus) as slurm, http_service(
                server, f"http://127.0.0.1:{port}", folder, user_env(mnist), folder / "mlflow.log") as url:
            (folder / "ws").mkdir()
            env = user_env(mnist, MLFLOW_TRACKING_URI=url, VAELAB_SCRATCH=str(folder), **slurm.env)
            project = new_project(folder / "ws", env, **DEFAULTS)
            point = [arg for value in args.points for arg in ("-S", value)]
            print(project.run("vaelab", "slurm", "submit", *point, "--cpus-per-task", str(args.cpus)), flush=True)
            while slurm.run("squeue", "-h", check=False).strip():
                time.sleep(5)
            flags = Path("/proc/cpuinfo").read_text()
            print(f"CPU: {processor_name(torch.device('cpu'))}, {'avx512f' if ' avx512f' in flags else 'no avx512f'}, "
                  f"{os.cpu_count()} cores")
            print(project.run("vaelab", "slurm", "status"))
            print(project.run("vaelab", "slurm", "timings"))


if __name__ == "__main__":
    main()
