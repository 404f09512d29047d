"""Stage `evaluate`: test-set negative ELBO, its parts and the per-pixel MSE, into a DVC metric and MLflow.

usage: python pipeline/evaluate.py DATA_DIR MODEL_DIR METRICS_JSON
"""
import json

from vaelab import config, data, metrics, tracking
from vaelab.model import load_vae
from vaelab.stages import atomic_file, check_writable, paths, run_stage


def main(argv):
    params = config.load()
    data_dir, model_dir, metrics_json = paths(argv, "DATA_DIR", "MODEL_DIR", "METRICS_JSON")
    check_writable(metrics_json)
    tracking.check_reachable()
    model = load_vae(model_dir / "vae.pt")
    test = data.load_split(data_dir, "test")
    results = {f"test_{k}": v for k, v in metrics.elbo_metrics(model, data.to_float(test.images), params.seed).items()}
    with tracking.resumed_run(model_dir / "run.json"):
        tracking.log_metrics(results)
    with atomic_file(metrics_json) as path:
        path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(f"{k}: {v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
    run_stage(main)
