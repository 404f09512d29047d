"""Test-set metrics of a trained VAE, in nats per image (the units papers report)."""
from __future__ import annotations

import math

import torch

from vaelab.model import SEED_LOSS_SCALE, VAE, negative_elbo, reconstruction_nll

EVAL_BATCH = 1000


@torch.no_grad()
def reconstruct(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """Decode each image's latent mean: the deterministic reconstruction (n, 28, 28) in [0, 1]."""
    return model.decode(model.encoder(images)[0])


@torch.no_grad()
def elbo_metrics(model: VAE, images: torch.Tensor, seed: int) -> dict[str, float]:
    """Negative ELBO and its reconstruction and KL parts (one seeded z sample per image), the seed's
    scaled loss, and the per-pixel MSE of the mean reconstruction. `model` must be in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start : start + EVAL_BATCH]
        logits, mean, log_var = model(x)
        neg_elbo, reconstruction, kl = negative_elbo(logits, x, mean, log_var)
        squared_error = (reconstruct(model, x).reshape(len(x), -1) - x).square().mean(dim=1)
        totals += torch.stack([neg_elbo.sum(), reconstruction.sum(), kl.sum(), squared_error.sum()]).double()
    torch.random.set_rng_state(generator_state)
    neg_elbo, reconstruction, kl, mse = (totals / len(images)).tolist()
    return {
        "neg_elbo": neg_elbo,
        "reconstruction": reconstruction,
        "kl": kl,
        "seed_loss": neg_elbo / SEED_LOSS_SCALE,
        "mse_per_pixel": mse,
    }


def _log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dimension."""
    return -0.5 * (((z - mean).square() / log_var.exp()) + log_var + math.log(2 * math.pi)).sum(dim=-1)


@torch.no_grad()
def importance_log_likelihood(model: VAE, images: torch.Tensor, samples: int,
                              max_rows: int = 50_000) -> torch.Tensor:
    """The importance-sampled estimate of log p(x) per image (Burda et al. 2015):
    logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).

    Vectorised over images and samples; at most `max_rows` decoded images are held at once. With K = 1
    this is the ELBO; it grows towards log p(x) as K grows. `model` must be in eval mode."""
    images_per_chunk = max(1, max_rows // samples)
    sample_chunk = min(samples, max_rows)
    estimates = []
    for start in range(0, len(images), images_per_chunk):
        x = images[start : start + images_per_chunk]
        mean, log_var = model.encoder(x)
        log_weights = []
        for done in range(0, samples, sample_chunk):
            k = min(sample_chunk, samples - done)
            z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * torch.randn(
                len(x), k, mean.shape[1], device=x.device)
            logits = model.decoder(z.reshape(-1, z.shape[-1])).reshape(len(x), k, -1)
            log_px_z = -reconstruction_nll(logits, x.unsqueeze(1).expand_as(logits))
            zeros = torch.zeros_like(mean).unsqueeze(1)
            log_weights.append(log_px_z + _log_normal(z, zeros, zeros) - _log_normal(z, mean.unsqueeze(1),
                                                                                   log_var.unsqueeze(1)))
        estimates.append(torch.logsumexp(torch.cat(log_weights, dim=1), dim=1) - math.log(samples))
    return torch.cat(estimates)
