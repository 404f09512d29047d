"""The likelihood estimates against an exact integral, on models whose latent is one-dimensional."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from vaelab import data
from vaelab.config import Params
from vaelab import metrics
from vaelab.metrics import elbo_metrics, importance_log_likelihood, log_likelihood_per_label, marginal_log_likelihood
from vaelab.model import reconstruction_nll, reconstruction_nll_, sample_posterior
from vaelab.training import train


@pytest.fixture(scope="module")
def one_dim_model(mnist):
    images = data.to_float(mnist["train"].images[:3000])
    params = Params(latent_dim=1, epochs=3, batch_size=100, lr=1e-3, device="cpu")
    return train(params, images[:2500], images[2500:], images[:100]).model.eval()


@pytest.fixture(scope="module")
def one_dim_conditional_model(mnist):
    images, labels = data.to_float(mnist["train"].images[:3000]), mnist["train"].labels[:3000]
    # 10 epochs: after 3, q(z|x, y) is still far from the posterior and a bound of 5000 samples can be nats off
    params = Params(latent_dim=1, epochs=10, batch_size=100, lr=1e-3, device="cpu", conditional=True)
    return train(params, images[:2500], images[2500:], images[:100],
                 labels=(labels[:2500], labels[2500:], labels[:100])).model.eval()


@torch.no_grad()
def _exact_log_likelihood(model, x: torch.Tensor, points: int = 20001, limit: float = 10.0,
                          label: int | None = None) -> torch.Tensor:
    """log p(x) = log integral p(x|z) p(z) dz (or log p(x|y) under `label`), by the trapezoid-free Riemann sum on
    a fine 1-D grid."""
    z = torch.linspace(-limit, limit, points).unsqueeze(1)
    logits = model.decoder(z, None if label is None else torch.full((points,), label))
    log_px_z = -torch.stack([reconstruction_nll(logits, image.expand_as(logits)) for image in x])
    log_pz = -0.5 * z.squeeze(1).square() - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(log_px_z + log_pz, dim=1) + math.log(2 * limit / (points - 1))


def test_importance_estimate_agrees_with_the_exact_likelihood(one_dim_model, mnist):
    x = data.to_float(mnist["test"].images[:8])
    torch.manual_seed(0)
    estimate = importance_log_likelihood(one_dim_model, x, samples=5000)
    torch.testing.assert_close(estimate, _exact_log_likelihood(one_dim_model, x), atol=0.5, rtol=0)


def test_conditional_estimates_agree_with_the_exact_likelihoods_given_each_label_and_over_labels(
        one_dim_conditional_model, mnist):
    x, y = data.to_float(mnist["test"].images[:8]), mnist["test"].labels[:8]
    torch.manual_seed(0)
    per_label = log_likelihood_per_label(one_dim_conditional_model, x, samples=5000)
    exact = torch.stack([_exact_log_likelihood(one_dim_conditional_model, x, label=d) for d in range(10)], dim=1)
    # A 1-D posterior given a label can have two modes that a Gaussian q(z|x, y) covers unevenly: some images' bounds
    # are up to half a nat off at K = 5000. Labels routed to the wrong images or samples would be nats off.
    true = y.unsqueeze(1)
    torch.testing.assert_close(per_label.gather(1, true), exact.gather(1, true), atol=1.0, rtol=0)
    # (under a wrong label q(z|x, y') is a poor proposal, the bound often nats low; p(x) hardly depends on it)
    exact_marginal = torch.logsumexp(exact, dim=1) - math.log(10)  # uniform p(y)
    torch.testing.assert_close(marginal_log_likelihood(per_label), exact_marginal, atol=1.0, rtol=0)


def test_a_conditional_runs_bound_of_log_p_x_is_within_ln_10_of_its_bound_given_the_label(
        one_dim_conditional_model, mnist):
    """p(x) = (1/10) sum_y' p(x|y') >= p(x|y) / 10, so -log p(x) <= -log p(x|y) + ln 10: exactly so for the
    estimates, image by image, when they come from the same samples."""
    x, y = data.to_float(mnist["test"].images[:300]), mnist["test"].labels[:300]
    torch.manual_seed(0)
    per_label = log_likelihood_per_label(one_dim_conditional_model, x, samples=50)
    given_label = per_label.gather(1, y.unsqueeze(1)).squeeze(1)
    assert (-marginal_log_likelihood(per_label) <= -given_label + math.log(10) + 1e-4).all()

    train_x, train_y = data.to_float(mnist["train"].images[:500]), mnist["train"].labels[:500]
    results = metrics.test_results(one_dim_conditional_model, x, y, train_x, train_y, seed=0, iwae_samples=50)
    assert results["test_iwae_nll"] <= results["test_iwae_nll_given_label"] + math.log(10)
    assert results["test_iwae_nll"] == pytest.approx(-marginal_log_likelihood(per_label).mean().item(), abs=1e-4)
    assert results["test_elbo_gap"] == pytest.approx(results["test_neg_elbo"] - results["test_iwae_nll_given_label"])


@torch.no_grad()
def _reference_importance_log_likelihood(model, x: torch.Tensor, samples: int) -> torch.Tensor:
    """The bound written plainly: the module's own decoder, the cross-entropy, torch.distributions; the same
    draws as `importance_log_likelihood` when all of them fit in one chunk."""
    mean, log_var = model.encoder(x)
    std = torch.exp(0.5 * log_var)
    z = mean.unsqueeze(1) + std.unsqueeze(1) * torch.randn(len(x), samples, mean.shape[1])
    logits = model.decoder(z.reshape(-1, z.shape[-1])).view(len(x), samples, -1)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, x.unsqueeze(1).expand_as(logits), reduction="none").sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mean.unsqueeze(1), std.unsqueeze(1)).log_prob(z).sum(-1)
    return torch.logsumexp(log_px_z + log_pz - log_qz, dim=1) - math.log(samples)


@pytest.mark.parametrize("binarized", [False, True])
def test_the_estimate_equals_the_plainly_written_bound(one_dim_model, mnist, binarized):
    x = data.to_float(mnist["test"].images[:12])
    x = (x > 0.5).float() if binarized else x
    torch.manual_seed(5)
    estimate = importance_log_likelihood(one_dim_model, x, samples=1000, block_rows=700)
    torch.manual_seed(5)
    torch.testing.assert_close(estimate, _reference_importance_log_likelihood(one_dim_model, x, 1000),
                               rtol=1e-5, atol=1e-3)


@torch.no_grad()
def test_the_estimate_is_the_training_objectives_importance_weights_at_kl_weight_1(one_dim_model, mnist):
    """Evaluation's chunked bound and IWAE's training objective are one definition, `PosteriorSamples.log_weights`:
    for one image the two draw the same z from the same seed."""
    for image in data.to_float(mnist["test"].images[:5]):
        torch.manual_seed(7)
        estimate = importance_log_likelihood(one_dim_model, image[None], samples=500, block_rows=300)
        torch.manual_seed(7)
        log_weights = sample_posterior(one_dim_model, image[None], None, samples=500).log_weights()
        torch.testing.assert_close(estimate, torch.logsumexp(log_weights, dim=0) - math.log(500), rtol=1e-5, atol=1e-3)


def test_the_estimate_is_above_the_elbo_and_grows_with_k(one_dim_model, mnist):
    x = data.to_float(mnist["test"].images[:300])
    torch.manual_seed(0)
    means = [importance_log_likelihood(one_dim_model, x, samples=k).mean().item() for k in (1, 10, 100, 1000)]
    assert means[:3] == sorted(means[:3])
    assert means[3] > means[2] - 0.01  # beyond K = 100 this model gains about 0.001 nats, below the sampling noise
    elbo = -elbo_metrics(one_dim_model, x, seed=0)["neg_elbo"]
    assert means[-1] > elbo and means[0] == pytest.approx(elbo, abs=1.0)


def test_chunking_does_not_change_the_estimate(one_dim_model, mnist):
    x = data.to_float(mnist["test"].images[:20])
    torch.manual_seed(3)
    whole = importance_log_likelihood(one_dim_model, x, samples=64, max_rows=10_000)
    torch.manual_seed(3)
    chunked = importance_log_likelihood(one_dim_model, x, samples=64, max_rows=64 * 3)
    torch.testing.assert_close(whole, chunked)
    for block_rows in (1, 50, 100_000):  # decoding in blocks draws the same z: the same estimate up to rounding
        torch.manual_seed(3)
        blocked = importance_log_likelihood(one_dim_model, x, samples=64, max_rows=64 * 3, block_rows=block_rows)
        torch.testing.assert_close(blocked, chunked)


@pytest.mark.parametrize("binarized", [False, True])
def test_the_in_place_likelihood_of_many_samples_equals_the_cross_entropy(mnist, binarized):
    x = data.to_float(mnist["test"].images[:3])
    x = (x > 0.5).float() if binarized else x
    logits = torch.randn(3, 40, 784, generator=torch.Generator().manual_seed(0)) * 6
    expected = F.binary_cross_entropy_with_logits(logits, x.unsqueeze(1).expand_as(logits), reduction="none").sum(-1)
    torch.testing.assert_close(reconstruction_nll_(logits.clone(), x.unsqueeze(1)), expected, rtol=1e-6, atol=2e-4)
    torch.testing.assert_close(reconstruction_nll(logits, x.unsqueeze(1)), expected, rtol=1e-6, atol=2e-4)
    tracked = logits.clone().requires_grad_()  # with autograd, the cross-entropy itself
    torch.testing.assert_close(reconstruction_nll(tracked, x.unsqueeze(1).expand_as(logits)), expected)
