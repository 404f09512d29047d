"""Test-set metrics of a trained VAE, in nats per image (the units papers report)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from vaelab.model import (DIGITS, SEED_LOSS_SCALE, VAE, FoldedDecoder, encode_in_batches, kl_per_dimension,
                          log_normal, log_standard_normal, negative_elbo, reconstruction_nll_)

EVAL_BATCH = 1000
ACTIVE_UNIT_THRESHOLD = 0.01
RECONSTRUCTED_DIGITS = 10  # the first test images, reconstructed at each snapshot and by the render stage
DECODE_BLOCK_ROWS = 4096  # decoded images per block of the bound on a CPU: 12.8 MB of logits, cache-sized


@torch.no_grad()
def reconstruct(model: VAE, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Decode each image's latent mean: the deterministic reconstruction (n, 28, 28) in [0, 1]. A conditional
    VAE takes the images' digit `labels` to encode and decode; the seed's ignores them."""
    labels = model.labels_of(labels)
    return model.decode(model.encoder(images, labels)[0], labels)


@torch.no_grad()
def style_transfer(model: VAE, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The seed author's style transfer, for a conditional VAE: each image (n, 784) encoded to the mean of
    q(z|x, y) under its own label and decoded under each of the ten: (n, 10, 28, 28) in [0, 1]."""
    z = model.encoder(images, labels)[0]
    digits = torch.arange(DIGITS, device=z.device)
    return model.decode(z.repeat_interleave(DIGITS, dim=0), digits.repeat(len(z))).reshape(len(z), DIGITS, 28, 28)


@torch.no_grad()
def elbo_metrics(model: VAE, images: torch.Tensor, seed: int, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Negative ELBO and its reconstruction and KL parts (one seeded z sample per image; for a conditional VAE
    the bound of log p(x|y) given the true labels), the seed's scaled loss, the per-pixel MSE of the mean
    reconstruction, and with `labels` the negative ELBO of each digit. `model` must be in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    given = None if labels is None else model.labels_of(labels)
    per_image = []
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start : start + EVAL_BATCH]
        y = None if given is None else given[start : start + EVAL_BATCH]
        logits, mean, log_var = model(x, y)
        neg_elbo, reconstruction, kl = negative_elbo(logits, x, mean, log_var)
        squared_error = (reconstruct(model, x, y).reshape(len(x), -1) - x).square().mean(dim=1)
        per_image.append(torch.stack([neg_elbo, reconstruction, kl, squared_error], dim=1).double())
    torch.random.set_rng_state(generator_state)
    per_image = torch.cat(per_image)
    neg_elbo, reconstruction, kl, mse = per_image.mean(dim=0).tolist()
    results = {
        "neg_elbo": neg_elbo,
        "reconstruction": reconstruction,
        "kl": kl,
        "seed_loss": neg_elbo / SEED_LOSS_SCALE,
        "mse_per_pixel": mse,
    }
    if labels is not None:
        for digit in range(10):
            results[f"neg_elbo_digit_{digit}"] = per_image[labels == digit, 0].mean().item()
    return results


@torch.no_grad()
def latent_diagnostics(model: VAE, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Active units (dimensions whose Cov_x(E_q[z]) exceeds 0.01, Burda et al. 2015) and the mean KL of
    each latent dimension, in nats; a conditional VAE's q(z|x, y) given the images' `labels`."""
    mean, log_var = encode_in_batches(model, images, model.labels_of(labels))
    kl = kl_per_dimension(mean, log_var).mean(dim=0)
    results = {"active_units": int((mean.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum())}
    results.update({f"kl_z{i}": value for i, value in enumerate(kl.tolist())})
    return results


def latent_classifier_accuracy(model: VAE, train_images, train_labels, test_images, test_labels) -> float:
    """How well the latent means separate digits: test accuracy of a multinomial logistic regression
    fitted (L-BFGS, standardised features) on the training images' latent means. A conditional VAE's means
    are those of q(z|x, y) given the true label: z need not carry the digit then, and this says whether it does."""
    train_z = encode_in_batches(model, train_images, model.labels_of(train_labels))[0]
    test_z = encode_in_batches(model, test_images, model.labels_of(test_labels))[0]
    centre, scale = train_z.mean(dim=0), train_z.std(dim=0).clamp_min(1e-6)
    train_z, test_z = (train_z - centre) / scale, (test_z - centre) / scale
    generator = torch.Generator().manual_seed(0)
    classifier = torch.nn.Linear(train_z.shape[1], 10)
    torch.nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(classifier.bias)
    classifier.to(train_z.device)  # initialised on the CPU, so every device starts from the same weights
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(train_z), train_labels)
        loss = loss + 1e-4 * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (classifier(test_z).argmax(dim=1) == test_labels).float().mean().item()


@torch.no_grad()
def importance_log_likelihood(model: VAE, images: torch.Tensor, samples: int, labels: torch.Tensor | None = None,
                              max_rows: int = 50_000, block_rows: int | None = None,
                              on_progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """The importance-sampled estimate of log p(x) per image (Burda et al. 2015):
    logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x); for a conditional VAE, of
    log p(x|y) given `labels`, with q(z|x, y) and p(x|z, y).

    Vectorised over images and samples: the z of up to `max_rows` samples are drawn at once (so the random
    numbers, and the estimate, do not depend on `block_rows`), then decoded (the decoder's BatchNorms folded into
    its layers, `FoldedDecoder`) and scored about `block_rows` at a time: by default on a CPU a block small
    enough that its logits stay in cache between passes, on a GPU the whole chunk, since there a block's cost
    is its kernel launches. With K = 1 this is the ELBO; it grows towards log p(x) as K grows. `model` must be
    in eval mode. `on_progress` is called with the number of images done after each chunk (K = 5000 takes
    minutes on a CPU)."""
    images_per_chunk = max(1, max_rows // samples)
    sample_chunk = min(samples, max_rows)
    block_rows = block_rows or (DECODE_BLOCK_ROWS if images.device.type == "cpu" else max_rows)
    decoder = FoldedDecoder(model.decoder)
    estimates = []
    for start in range(0, len(images), images_per_chunk):
        x = images[start : start + images_per_chunk]
        y = None if labels is None else labels[start : start + images_per_chunk]
        mean, log_var = model.encoder(x, y)
        log_weights = []
        for done in range(0, samples, sample_chunk):
            k = min(sample_chunk, samples - done)
            z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * torch.randn(
                len(x), k, mean.shape[1], device=x.device)
            log_pz_over_q = log_standard_normal(z) - log_normal(z, mean.unsqueeze(1), log_var.unsqueeze(1))
            log_weights.append(_log_likelihood_given(decoder, z, x, y, block_rows) + log_pz_over_q)
        estimates.append(torch.logsumexp(torch.cat(log_weights, dim=1), dim=1) - math.log(samples))
        if on_progress is not None:
            on_progress(len(x))
    return torch.cat(estimates)


def _log_likelihood_given(decoder: FoldedDecoder, z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None,
                          block_rows: int) -> torch.Tensor:
    """log p(x|z) (or p(x|z, y)) for z (n, k, latent) of the images x (n, 784): (n, k), decoded in blocks."""
    n, k, latent = z.shape
    per_block = max(1, block_rows // n)
    parts = []
    for done in range(0, k, per_block):
        block = z[:, done : done + per_block]
        block_labels = None if labels is None else labels.repeat_interleave(block.shape[1])
        logits = decoder(block.reshape(-1, latent), block_labels).view(n, block.shape[1], -1)
        parts.append(-reconstruction_nll_(logits, x.unsqueeze(1)))
    return torch.cat(parts, dim=1)


def log_likelihood_per_label(model: VAE, images: torch.Tensor, samples: int,
                             on_progress: Callable[[int], object] | None = None, **blocking) -> torch.Tensor:
    """A conditional VAE's importance-sampled log p(x|y) of each image under each of the ten labels: (n, 10).
    With the uniform label prior, log p(x) = logsumexp_y log p(x|y) - ln 10, which, bounded from these, is
    a bound of log p(x) that compares with an unconditional VAE's (at ten times the decoder's work)."""
    columns = []
    for digit in range(DIGITS):
        labels = torch.full((len(images),), digit, dtype=torch.int64, device=images.device)
        columns.append(importance_log_likelihood(model, images, samples, labels, on_progress=on_progress, **blocking))
    return torch.stack(columns, dim=1)


def marginal_log_likelihood(per_label: torch.Tensor) -> torch.Tensor:
    """log p(x) = log (1/10) sum_y p(x|y) per image, from log p(x|y) (n, 10) under a uniform label prior."""
    return torch.logsumexp(per_label, dim=1) - math.log(DIGITS)


def bound_passes(model: VAE) -> int:
    """How many times the importance-sampled bound goes over the test set: once per label for a conditional VAE."""
    return DIGITS if model.config.conditional else 1


def test_results(model: VAE, test_x, test_labels, train_x, train_labels, seed: int, iwae_samples: int,
                 on_progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """Everything the evaluate stage reports, keyed `test_<name>`: the ELBO metrics, the importance-sampled
    -log p(x) with K = `iwae_samples` and its gap to the ELBO, the latent diagnostics and the latent
    classifier's accuracy. For a conditional VAE the ELBO and its parts are given the true label, `iwae_nll` is
    the bound of -log p(x) over the ten labels, `iwae_nll_given_label` that of -log p(x|y) from the same samples,
    and the gap is the ELBO's to the latter. `model` must be in eval mode, on the device of the tensors."""
    results = elbo_metrics(model, test_x, seed, labels=test_labels)
    torch.manual_seed(seed)
    if model.config.conditional:
        per_label = log_likelihood_per_label(model, test_x, iwae_samples, on_progress=on_progress)
        results["iwae_nll"] = -marginal_log_likelihood(per_label).mean().item()
        results["iwae_nll_given_label"] = -per_label.gather(1, test_labels.unsqueeze(1)).mean().item()
        results["elbo_gap"] = results["neg_elbo"] - results["iwae_nll_given_label"]
    else:
        log_px = importance_log_likelihood(model, test_x, iwae_samples, on_progress=on_progress)
        results["iwae_nll"] = -log_px.mean().item()
        results["elbo_gap"] = results["neg_elbo"] - results["iwae_nll"]
    results.update(latent_diagnostics(model, test_x, test_labels))
    results["latent_classifier_accuracy"] = latent_classifier_accuracy(
        model, train_x, train_labels, test_x, test_labels)
    return {f"test_{k}": v for k, v in results.items()}


HEADLINE = ("test_neg_elbo", "test_reconstruction", "test_kl", "test_iwae_nll", "test_elbo_gap", "test_active_units",
            "test_latent_classifier_accuracy", "test_mse_per_pixel", "test_seed_loss")
CONDITIONAL_HEADLINE = ("test_iwae_nll_given_label",)  # a conditional run's, after test_iwae_nll


def split_results(results: dict[str, float]) -> tuple[dict[str, float], list[dict], list[dict]]:
    """The DVC metrics file's headline numbers (the same keys whatever the latent size, so `dvc exp show` has
    the same few columns for every experiment), and the per-digit and per-dimension values as rows for DVC's
    plots; MLflow gets all of them as metrics."""
    headline = {key: results[key] for key in HEADLINE + CONDITIONAL_HEADLINE if key in results}
    digits = [{"digit": d, "test_neg_elbo": results[f"test_neg_elbo_digit_{d}"]} for d in range(10)]
    dimensions = [{"dimension": int(k.removeprefix("test_kl_z")), "test_kl": v}
                  for k, v in results.items() if k.startswith("test_kl_z")]
    return headline, digits, dimensions


def evaluation_report(results: dict[str, float], binarize: str, samples: int) -> str:
    """reports/evaluation.md: what each test number means, and its caveats."""
    proper = binarize != "none"
    data_note = (
        f"Test images binarized once with a fixed seed (`binarize: {binarize}`), the same for every run, so "
        "p(x|z) is a proper Bernoulli likelihood and these numbers compare with the literature."
        if proper else
        "`binarize: none` (the seed): the pixels are grayscale, so the Bernoulli 'likelihood' of a pixel of 0.3 "
        "is not a probability of anything. The numbers below compare runs of this project with each other, "
        "not with published log-likelihoods; train with `binarize: dynamic` for those."
    )
    kl = {k: v for k, v in results.items() if k.startswith("test_kl_z")}
    digits = [results[f"test_neg_elbo_digit_{d}"] for d in range(10)]
    conditional = "test_iwae_nll_given_label" in results
    lines = [
        "# Evaluation on the MNIST test set (10,000 images)",
        "",
        data_note,
        "",
        *(_conditional_note(results, samples) if conditional else []),
        "| number | value | meaning |",
        "| --- | --- | --- |",
        f"| negative ELBO | {results['test_neg_elbo']:.2f} nats | -E_q[log p(x\\|z)] + KL(q(z\\|x) \\|\\| p(z)), one z sample "
        "per image: an upper bound on -log p(x) |" if not conditional else
        f"| negative ELBO given the label | {results['test_neg_elbo']:.2f} nats | -E_q[log p(x\\|z, y)] + "
        "KL(q(z\\|x, y) \\|\\| p(z)) with the true label y, one z sample per image: an upper bound on -log p(x\\|y), "
        "not on -log p(x) |",
        f"| reconstruction | {results['test_reconstruction']:.2f} nats | -E_q[log p(x\\|z)] |",
        f"| KL | {results['test_kl']:.2f} nats | KL(q(z\\|x) \\|\\| N(0, I)), closed form |",
        f"| -log p(x), importance-sampled | {results['test_iwae_nll']:.2f} nats | Burda et al. 2015, K = {samples} "
        "samples of q per image; a tighter upper bound on -log p(x) that tends to it as K grows |" if not conditional else
        f"| -log p(x), importance-sampled | {results['test_iwae_nll']:.2f} nats | -log (1/10) sum_y p(x\\|y), each "
        f"p(x\\|y) bounded with K = {samples} samples of q(z\\|x, y): an upper bound on -log p(x) that tends to it as "
        "K grows |",
        *([f"| -log p(x\\|y), importance-sampled | {results['test_iwae_nll_given_label']:.2f} nats | the same bound "
           "given the true label, from the same samples |"] if conditional else []),
        f"| ELBO gap | {results['test_elbo_gap']:.2f} nats | negative ELBO minus the estimate"
        + (" given the label: how far q(z\\|x, y)" if conditional else ": how far q(z\\|x)")
        + " is from the true posterior (plus the estimate's own bias) |",
        f"| per-pixel MSE | {results['test_mse_per_pixel']:.4f} | of the reconstruction decoded from each image's latent mean |",
        f"| active units | {results['test_active_units']} of {len(kl)} | latent dimensions whose mean moves with the "
        "input (Cov_x(E_q[z]) > 0.01); the others collapsed onto the prior |",
        f"| latent classifier accuracy | {results['test_latent_classifier_accuracy']:.3f} | a logistic regression "
        "fitted on the training images' latent means, tested on the test images': how well the latent space "
        "separates digits (0.1 is chance) |",
        f"| seed's loss | {results['test_seed_loss']:.5f} | the negative ELBO / 1568, the number the tutorial prints |",
        "",
        "Negative ELBO per digit (nats): " + ", ".join(f"{d}: {v:.1f}" for d, v in enumerate(digits)) + ".",
        "",
        "KL per latent dimension (nats): " + ", ".join(f"z{k.removeprefix('test_kl_z')}: {v:.2f}" for k, v in kl.items())
        + ".",
        "",
        "Caveats: each number is an estimate from random samples (one per image for the ELBO, K for the "
        "importance-sampled bound), seeded, so a rerun gives the same value; the importance-sampled bound "
        "is biased upward for small K.",
        "",
    ]
    return "\n".join(lines)


def _conditional_note(results: dict[str, float], samples: int) -> list[str]:
    """What compares across a conditional and an unconditional run, and what does not."""
    return [
        "A conditional VAE (`conditional: true`): the digit label is an input. Only `test_iwae_nll`, the bound "
        "of -log p(x) with p(x) = (1/10) sum_y p(x|y), compares with an unconditional run's `test_iwae_nll` (at the "
        f"same K; here K = {samples} per label). The ELBO, its reconstruction and KL, the gap and "
        f"`test_iwae_nll_given_label` ({results['test_iwae_nll_given_label']:.2f} nats) are given the true label: "
        "they bound -log p(x|y), which is lower than -log p(x) by at most ln 10 = 2.30 nats (the label's "
        "information), and do not compare with an unconditional run's. Active units and the latent classifier "
        "describe q(z|x, y): with the label given, z need not carry the digit, and the classifier shows whether "
        "it still does.",
        "",
    ]
