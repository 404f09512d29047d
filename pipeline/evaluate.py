"""Stage `evaluate`: on the test set, in eval mode, the negative ELBO and its parts, the importance-sampled
log-likelihood bound, latent diagnostics and per-digit scores, into DVC metrics and plots, a short report and MLflow.

usage: python pipeline/evaluate.py DATA_DIR MODEL_DIR METRICS_JSON PER_DIGIT_CSV PER_DIMENSION_CSV EVALUATION_MD

METRICS_JSON holds the headline numbers (DVC's metrics, `dvc exp show`), the two CSV files the negative ELBO
of each digit and the KL of each latent dimension (DVC's plots); MLflow gets all of them.
"""
import json

from tqdm import tqdm

from vaelab import access, config, data, handoff, metrics
from vaelab.model import resolve_device
from vaelab.saved_model import load_vae
from vaelab.stages import atomic_file, check_writable, paths, run_stage, warn_if_cores_busy, write_rows


def main(argv):
    params = config.load()
    data_dir, model_dir, metrics_json, per_digit_csv, per_dimension_csv, evaluation_md = paths(
        argv, "DATA_DIR", "MODEL_DIR", "METRICS_JSON", "PER_DIGIT_CSV", "PER_DIMENSION_CSV", "EVALUATION_MD")
    check_writable(metrics_json, per_digit_csv, per_dimension_csv, evaluation_md)
    device = resolve_device(params.device)
    handoff.read_run_id(model_dir / "run.json", required=True)  # a damaged one stops the stage before any output
    model = load_vae(model_dir / "vae.pt", params.conditional, params.architecture).to(device)
    train, test = data.load_split(data_dir, "train"), data.load_split(data_dir, "test")
    access.check_access(write=True, patient=True)  # the run exists: a server away may be restarting
    test_x = data.model_inputs(test.images, params.binarize, "test")
    train_x = data.model_inputs(train.images, "none" if params.binarize == "none" else "static", "train")
    test_x, test_labels, train_x, train_labels = (t.to(device) for t in (test_x, test.labels, train_x, train.labels))

    warn_if_cores_busy(device)
    passes = metrics.bound_passes(model)  # a conditional VAE's bound goes over the test set under each label
    with tqdm(total=passes * len(test_x), unit="image", desc=f"log p(x), K = {params.iwae_samples}, on {device}") as bar:
        results = metrics.test_results(model, test_x, test_labels, train_x, train_labels, params.seed,
                                       params.iwae_samples, on_progress=bar.update)

    headline, per_digit, per_dimension = metrics.split_results(results)
    with atomic_file(metrics_json) as path:
        path.write_text(json.dumps(headline, indent=2) + "\n")
    for rows, csv_path in ((per_digit, per_digit_csv), (per_dimension, per_dimension_csv)):
        with atomic_file(csv_path) as path:
            write_rows(rows, path)
    with atomic_file(evaluation_md) as path:
        path.write_text(metrics.evaluation_report(results, params.binarize, params.iwae_samples))
    for key in ("test_neg_elbo", "test_iwae_nll", "test_iwae_nll_given_label", "test_elbo_gap", "test_active_units",
                "test_latent_classifier_accuracy", "test_mse_per_pixel"):
        if key in results:
            print(f"{key}: {results[key]:.4f}")
    handoff.add_to_run(model_dir / "run.json", "the test metrics and evaluation.md",
                        metrics=results, artifacts={evaluation_md: None},
                        tags={"iwae_samples": str(params.iwae_samples)})  # the K of test/iwae_nll


if __name__ == "__main__":
    run_stage(main)
