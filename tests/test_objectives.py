"""Burda et al.'s network, the importance-weighted objective and the data's output bias: each acts as defined."""
import copy
import math

import pytest
import torch
from torch import nn

from vaelab import data
from vaelab.backprop import FastStep
from vaelab.config import Params, ParamsError
from vaelab.model import VAE, FoldedDecoder, ModelConfig, data_mean_logits, objective_terms, sample_posterior
from vaelab.saved_model import load_vae, save_vae
from vaelab.training import AutogradStep, train

NETWORKS = [ModelConfig(50, 0.0, architecture="burda"), ModelConfig(5, 0.3), ModelConfig(3, 0.0, True, "burda")]


def _batch(mnist, n=64):
    return data.to_float(mnist["train"].images[:n]), mnist["train"].labels[:n]


def test_burdas_network_has_their_layer_sizes_tanh_and_neither_batchnorm_nor_dropout():
    model = VAE(ModelConfig(50, 0.0, architecture="burda"))
    dense = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert dense == [(784, 200), (200, 200), (200, 50), (200, 50), (50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 4
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) for m in model.modules())
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))  # Glorot, zero biases


def test_burdas_encoder_gives_the_log_standard_deviation_so_its_log_variance_is_twice_the_head():
    model = VAE(ModelConfig(4, 0.0, architecture="burda")).eval()
    x = torch.rand(3, 784)
    mean, log_var = model.encoder(x)
    h = model.encoder.body(x)
    torch.testing.assert_close(log_var, 2 * model.encoder.log_var(h))
    torch.testing.assert_close(mean, model.encoder.mean(h))


@pytest.mark.parametrize("config", NETWORKS, ids=["burda", "seed", "burda-conditional"])
def test_the_folded_decoder_is_the_decoder_and_a_saved_model_loads_as_it_was(config, tmp_path):
    model = VAE(config).eval()
    z = torch.randn(7, config.latent_dim)
    labels = torch.arange(7) if config.conditional else None
    torch.testing.assert_close(FoldedDecoder(model.decoder)(z, labels), model.decoder(z, labels), rtol=1e-5, atol=1e-5)
    save_vae(model, tmp_path / "vae.pt")
    loaded = load_vae(tmp_path / "vae.pt", config.conditional, config.architecture)
    assert loaded.config == config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    other = "seed" if config.architecture == "burda" else "burda"
    with pytest.raises(ParamsError, match=f"holds a VAE of architecture {config.architecture}, but params.yaml has "
                                          f"architecture: {other}; run the train stage again"):
        load_vae(tmp_path / "vae.pt", architecture=other)


def test_the_output_bias_starts_at_the_logit_of_each_clipped_mean_pixel(mnist):
    images = data.to_float(mnist["train"].images[:1000])
    means = images.double().mean(dim=0)
    expected = torch.log(means.clamp(0.001, 0.999) / (1 - means.clamp(0.001, 0.999))).float()
    torch.testing.assert_close(data_mean_logits(images), expected)
    assert data_mean_logits(images).min() == pytest.approx(math.log(0.001 / 0.999), rel=1e-5)  # the blank corners
    # train's first step starts from it: at a vanishing rate the bias ends where it started
    params = Params(epochs=1, batch_size=500, device="cpu", lr=1e-9, output_bias="data_mean")
    result = train(params, images, images[:200], images[:20])
    torch.testing.assert_close(result.model.decoder.output.bias, expected, atol=1e-5, rtol=0)
    assert (train(Params(epochs=1, batch_size=500, device="cpu", lr=1e-9), images, images[:200], images[:20])
            .model.decoder.output.bias.abs().max() < 1e-5)


@pytest.mark.parametrize("config", NETWORKS, ids=["burda", "seed", "burda-conditional"])
@pytest.mark.parametrize("samples", [1, 5])
def test_each_objective_is_its_definition_over_the_same_samples(mnist, config, samples):
    x, labels = _batch(mnist)
    labels = labels if config.conditional else None
    model = VAE(config).eval()
    torch.manual_seed(0)
    drawn = sample_posterior(model, x, labels, samples)
    iwae_bound = torch.logsumexp(drawn.log_weights(), dim=0) - math.log(samples)
    torch.manual_seed(0)
    loss, reconstruction, kl = objective_terms(model, x, labels, "iwae", samples)
    torch.testing.assert_close(loss, -iwae_bound)
    torch.testing.assert_close(reconstruction, drawn.reconstruction.mean(dim=0))
    # the ELBO objective of the same samples: their mean reconstruction plus the KL in closed form
    torch.manual_seed(0)
    elbo, _, _ = objective_terms(model, x, labels, "elbo", samples)
    torch.testing.assert_close(elbo, drawn.reconstruction.mean(dim=0) + kl)


@pytest.mark.parametrize("config", [ModelConfig(1, 0.0, architecture="burda"), ModelConfig(1, 0.3),
                                    ModelConfig(1, 0.0, True, "burda")], ids=["burda", "seed", "burda-conditional"])
def test_the_importance_weighted_bound_rises_to_log_p_x_computed_by_quadrature(mnist, config):
    """With one latent dimension, log p(x) = log integral p(x|z) N(z; 0, 1) dz is a sum over a fine grid of z,
    written here from the densities' textbook forms, not the model's helpers. Burda et al.'s bound must stay
    below it, and approach it as k grows: a wrong constant or sign in the log weights would miss it."""
    x, labels = _batch(mnist, 32)
    labels = labels if config.conditional else None
    torch.manual_seed(0)
    model = VAE(config).eval()
    grid = torch.linspace(-10, 10, 4001)
    with torch.no_grad():
        log_p_x = []
        for i, image in enumerate(x):
            logits = model.decoder(grid[:, None], None if labels is None else labels[i].repeat(len(grid)))
            log_likelihood = -nn.functional.binary_cross_entropy_with_logits(
                logits, image.expand_as(logits), reduction="none").sum(dim=1)
            log_prior = -0.5 * (grid.square() + math.log(2 * math.pi))
            log_p_x.append(torch.logsumexp(log_likelihood + log_prior, dim=0) + math.log(grid[1] - grid[0]))
        gaps = {}
        for k in (1, 10, 1000):
            bounds = [torch.logsumexp(sample_posterior(model, x, labels, k).log_weights(), dim=0) - math.log(k)
                      for _ in range(10)]
            gaps[k] = (torch.stack(log_p_x) - torch.stack(bounds).mean(dim=0)).mean().item()
    assert gaps[1] > gaps[10] > abs(gaps[1000]) and gaps[1] > 0.2  # the ELBO (k = 1) is well below
    assert abs(gaps[1000]) < 0.01  # nats per image: the bound has reached log p(x)


@pytest.mark.parametrize("config", NETWORKS, ids=["burda", "seed", "burda-conditional"])
@pytest.mark.parametrize("samples", [1, 5])
def test_the_iwae_gradient_weighs_each_samples_gradient_by_its_normalised_weight_held_constant(mnist, config, samples):
    """Burda et al.'s estimator, sum_k w~_k grad log w_k with w~ = softmax(log w) treated as constants, is what
    autograd of the objective's definition gives; at k = 1 it is the gradient of the one sample's log w."""
    x, labels = _batch(mnist)
    labels = labels if config.conditional else None
    torch.manual_seed(3)
    model = VAE(config).train()
    reference = copy.deepcopy(model)
    torch.manual_seed(4)
    objective_terms(model, x, labels, "iwae", samples)[0].mean().backward()
    torch.manual_seed(4)
    log_weights = sample_posterior(reference, x, labels, samples).log_weights()
    normalised = torch.softmax(log_weights, dim=0).detach()
    (-(normalised * log_weights).sum(dim=0).mean()).backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)  # gradients of order 1


@pytest.mark.parametrize("conditional", [False, True])
def test_the_hand_written_step_is_the_autograd_step_of_the_elbos_definition(mnist, conditional):
    """Without dropout the hand-written step's gradients, statistics and BatchNorm state are those of autograd of
    `objective_terms` (the same z noise), at a KL weight other than 1 too."""
    x, labels = _batch(mnist, 300)
    labels = labels if conditional else None
    torch.manual_seed(0)
    model = VAE(ModelConfig(4, 0.0, conditional)).train()
    reference = copy.deepcopy(model)
    assert FastStep.covers(model, "elbo", 1) and not FastStep.covers(model, "iwae", 1)
    assert not FastStep.covers(model, "elbo", 5) and not FastStep.covers(VAE(NETWORKS[0]), "elbo", 1)
    torch.manual_seed(1)
    fast = FastStep(model, kl_weight=0.5, kernel="mm")(x, labels)
    torch.manual_seed(1)
    slow = AutogradStep(reference, "elbo", 1, kl_weight=0.5)(x, labels)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-3)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def _run(mnist, **overrides):
    params = Params(**{"epochs": 2, "batch_size": 100, "device": "cpu", "latent_dim": 4, "dropout": 0.0,
                       "binarize": "dynamic", **overrides})
    images, labels = data.to_float(mnist["train"].images[:1000]), mnist["train"].labels[:1000]
    return train(params, images[:790], images[790:], images[:300], labels=(labels[:790], labels[790:], labels[:300]))


@pytest.mark.parametrize("overrides", [dict(architecture="burda", objective="iwae", train_samples=5),
                                       dict(objective="iwae", train_samples=3, conditional=True),
                                       dict(architecture="burda", train_samples=2, kl_warmup_epochs=2)],
                         ids=["burda-iwae", "seed-iwae-conditional", "burda-vae-k2-warmup"])
def test_a_run_through_autograd_is_seeded_and_logs_its_objective_beside_the_elbo(mnist, overrides):
    first, second = _run(mnist, **overrides), _run(mnist, **overrides)
    assert first.history == second.history
    assert first.model.config.architecture == overrides.get("architecture", "seed")
    for row in first.history:
        assert math.isfinite(row["train_objective"])
        assert row["train_neg_elbo"] == pytest.approx(row["train_reconstruction"] + row["train_kl"], rel=1e-5)
    if overrides.get("objective") == "iwae":  # the bound it maximises is above the ELBO
        assert all(row["train_objective"] < row["train_neg_elbo"] for row in first.history)
