"""The seed's VAE (Keras 2 tutorial, part 3) in PyTorch, Burda et al.'s network, the conditional form of both, and
their objectives: the ELBO (the seed's) and the importance-weighted bound (IWAE, Burda et al. 2015).

Faithful to Keras 2's defaults where they differ from PyTorch's: Glorot-uniform weights and zero biases,
BatchNorm with momentum 0.99 (PyTorch: 0.01) and epsilon 1e-3, LeakyReLU slope 0.3.

The conditional VAE (`conditional=True`, the seed author's planned next step; Kingma et al. 2014's M2 with every
label observed) is the same networks with the one-hot digit label concatenated to x at the encoder's input and to
z at the decoder's: q(z|x, y), p(x|z, y), prior N(0, I). Every function that takes `labels` (int64 digits, (n,))
needs them for a conditional model and refuses them for the seed's.

`architecture: burda` is Burda et al.'s one-stochastic-layer network (yburda/iwae, `iwae.py`): 784-200-200 tanh to
the latents' mean and log standard deviation, and 200-200 tanh back to 784 logits; Glorot-uniform weights, zero
biases, no BatchNorm, no dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import ARCHITECTURES, OBJECTIVES, ParamsError

IMAGE_PIXELS = 28 * 28
SEED_LOSS_SCALE = 2 * IMAGE_PIXELS  # the seed divides the per-image negative ELBO by 2 * 28 * 28
DIGITS = 10  # the labels of a conditional VAE
KERAS_BN = dict(eps=1e-3, momentum=0.01)
KERAS_LEAKY_SLOPE = 0.3
BURDA_HIDDEN = 200  # both hidden layers of Burda et al.'s encoder and decoder
OUTPUT_BIAS_CLIP = 0.001  # Burda et al. clip each mean pixel to [0.001, 0.999] before its logit


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 2
    dropout: float = 0.3
    conditional: bool = False
    architecture: str = "seed"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "burda" and self.dropout:
            raise ValueError(f"dropout {self.dropout} does not apply to Burda et al.'s network, which has none")

    @classmethod
    def of(cls, params) -> "ModelConfig":
        """The network that a validated `vaelab.config.Params` describes."""
        return cls(params.latent_dim, params.dropout, params.conditional, params.architecture)

    @property
    def label_width(self) -> int:
        """The one-hot label's columns beside x and beside z: 10 for a conditional VAE, none for the seed's."""
        return DIGITS if self.conditional else 0

    @property
    def kind(self) -> str:
        return "conditional" if self.conditional else "unconditional"


class LabelMismatch(ValueError):
    """Labels given to the seed's VAE, or none to a conditional one."""


def one_hot(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Digits (n,) as one-hot rows (n, 10), by a scatter: unlike F.one_hot it reads no value back to the host,
    so a CUDA graph can record it."""
    return torch.zeros(len(labels), DIGITS, dtype=dtype, device=labels.device).scatter_(1, labels.unsqueeze(1), 1.0)


def with_label(inputs: torch.Tensor, labels: torch.Tensor | None, config: ModelConfig) -> torch.Tensor:
    """`inputs` (n, features) with the one-hot labels beside them for a conditional VAE; as they are for the
    seed's. A missing or unexpected `labels` is a LabelMismatch naming the kind of model."""
    if (labels is not None) != config.conditional:
        wanted = "needs the digit labels" if config.conditional else "takes no labels (it is unconditional)"
        raise LabelMismatch(f"this VAE {wanted}")
    return inputs if labels is None else torch.cat([inputs, one_hot(labels, inputs.dtype)], dim=1)


def _dense(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _bn_dropout(width: int, dropout: float) -> list[nn.Module]:
    return [nn.BatchNorm1d(width, **KERAS_BN), nn.Dropout(dropout)]


def _tanh_chain(widths: list[int]) -> list[nn.Module]:
    """Burda et al.'s hidden layers: dense then tanh, for each pair of consecutive widths."""
    return [module for n_in, n_out in zip(widths, widths[1:]) for module in (_dense(n_in, n_out), nn.Tanh())]


class Encoder(nn.Module):
    """The seed's: 784 (+ 10 label) -> 256 ReLU -> BN -> Dropout -> 128 ReLU -> BN -> Dropout -> (mean, log-variance).
    Burda et al.'s: 784 (+ 10 label) -> 200 tanh -> 200 tanh -> (mean, log standard deviation): their code's
    parameterisation, so its second head's output is doubled into the log-variance."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inputs = IMAGE_PIXELS + config.label_width
        if config.architecture == "burda":
            self.body = nn.Sequential(*_tanh_chain([inputs, BURDA_HIDDEN, BURDA_HIDDEN]))
        else:
            self.body = nn.Sequential(
                _dense(inputs, 256), nn.ReLU(), *_bn_dropout(256, config.dropout),
                _dense(256, 128), nn.ReLU(), *_bn_dropout(128, config.dropout),
            )
        width = BURDA_HIDDEN if config.architecture == "burda" else 128
        self.mean = _dense(width, config.latent_dim)
        self.log_var = _dense(width, config.latent_dim)
        self.log_std_head = config.architecture == "burda"

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x), or of q(z|x, y) with `labels`."""
        h = self.body(with_label(x, labels, self.config))
        log_var = self.log_var(h)
        return self.mean(h), 2 * log_var if self.log_std_head else log_var


class Decoder(nn.Module):
    """The seed's: latent (+ 10 label) -> 128 LeakyReLU -> BN -> Dropout -> 256 LeakyReLU -> BN -> Dropout -> 784
    logits. Burda et al.'s: latent (+ 10 label) -> 200 tanh -> 200 tanh -> 784 logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inputs = config.latent_dim + config.label_width
        if config.architecture == "burda":
            self.net = nn.Sequential(*_tanh_chain([inputs, BURDA_HIDDEN, BURDA_HIDDEN]),
                                     _dense(BURDA_HIDDEN, IMAGE_PIXELS))
        else:
            self.net = nn.Sequential(
                _dense(inputs, 128), nn.LeakyReLU(KERAS_LEAKY_SLOPE), *_bn_dropout(128, config.dropout),
                _dense(128, 256), nn.LeakyReLU(KERAS_LEAKY_SLOPE), *_bn_dropout(256, config.dropout),
                _dense(256, IMAGE_PIXELS),
            )

    @property
    def output(self) -> nn.Linear:
        """The layer that writes the 784 logits; its bias may start at the data's (`output_bias: data_mean`)."""
        return self.net[-1]

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Bernoulli logits per pixel; `torch.sigmoid` of them is the seed's sigmoid output."""
        return self.net(with_label(z, labels, self.config))


MATMUL_KERNELS = ("mm", "onednn")


def matmul_kernel(device: torch.device) -> str:
    """The fp32 kernel for the dense layers' matrix products on `device`: `onednn` on a CPU where PyTorch runs
    AVX-512 code, `mm` elsewhere (torch.mm: MKL on a CPU, cuBLAS on a GPU). With AVX-512, PyTorch's oneDNN
    multiplied the model's shapes 1.05x (one AVX-512 EPYC) to 2x (another) as fast as MKL, which appears to keep
    to 256-bit code on AMD CPUs; limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) it was even with MKL, so there MKL
    stays. Chosen by the CPU's features, not by timing, so that a machine always makes the same choice and a
    seed gives the same run; the two kernels differ by float rounding."""
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return "onednn" if device.type == "cpu" and avx512 and torch.backends.mkldnn.is_available() else "mm"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none",
           kernel: str = "mm") -> torch.Tensor:
    """x @ weight.T + bias, then `activation` (`none`, `relu`, `tanh`, or `leaky_relu` with Keras's slope), with the
    matrix-multiply `kernel` (`matmul_kernel`): with oneDNN one call, the activation applied as the product is
    written."""
    if kernel == "onednn":
        slope = [KERAS_LEAKY_SLOPE] if activation == "leaky_relu" else []
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, slope, "")
    out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if activation == "relu":
        return out.relu_()
    if activation == "tanh":
        return out.tanh_()
    return F.leaky_relu_(out, KERAS_LEAKY_SLOPE) if activation == "leaky_relu" else out


class FoldedDecoder:
    """An eval-mode decoder as three dense layers with their activations fused. The seed's has each BatchNorm
    folded into the layer after it: in eval mode a BatchNorm is the affine map a * scale + shift, so
    W (a * scale + shift) + b = (W * scale) a + (W shift + b), and dropout is the identity. The same function up
    to float rounding, without two passes over the hidden units, for the importance-sampled bound's millions of
    decoded samples. A snapshot: build it anew after the weights change."""

    @torch.no_grad()
    def __init__(self, decoder: Decoder):
        net = decoder.net
        if decoder.config.architecture == "burda":
            self.layers = [(net[0].weight, net[0].bias, "tanh"), (net[2].weight, net[2].bias, "tanh"),
                           (net[4].weight, net[4].bias, "none")]
        else:
            self.layers = [(net[0].weight, net[0].bias, "leaky_relu"),
                           (*_folded(net[2], net[4]), "leaky_relu"), (*_folded(net[6], net[8]), "none")]
        self.kernel = matmul_kernel(net[0].weight.device)
        self.config = decoder.config

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Bernoulli logits (n, 784) of the latents z (n, latent_dim), as `Decoder.forward` in eval mode."""
        h = with_label(z, labels, self.config)
        for weight, bias, activation in self.layers:
            h = linear(h, weight, bias, activation, self.kernel)
        return h


def _folded(norm: nn.BatchNorm1d, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of `layer` after an eval-mode `norm`, as one affine map."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return layer.weight * scale, torch.addmv(layer.bias, layer.weight, shift)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n, 784) in [0, 1] -> (decoder logits, mean, log-variance), one z sample per image."""
        mean, log_var = self.encoder(x, labels)
        z = reparameterize(mean, log_var)
        return self.decoder(z, labels), mean, log_var

    @torch.no_grad()
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latent vectors (n, latent_dim) -> pixel intensities (n, 28, 28) in [0, 1]."""
        return torch.sigmoid(self.decoder(z, labels)).reshape(-1, 28, 28)

    def labels_of(self, labels: torch.Tensor) -> torch.Tensor | None:
        """What this model takes of a data set's `labels`: all of them if it is conditional, none otherwise."""
        return labels if self.config.conditional else None


def reparameterize(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I): a sample that gradients flow through."""
    return mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)


def kl_per_dimension(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL[N(mean, exp(log_var)) || N(0, 1)] of each latent dimension, in nats (closed form)."""
    return -0.5 * (1 + log_var - mean.square() - log_var.exp())


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL[N(mean, exp(log_var)) || N(0, I)] per image, in nats."""
    return kl_per_dimension(mean, log_var).sum(dim=-1)


@torch.no_grad()
def encode_in_batches(model: VAE, images: torch.Tensor, labels: torch.Tensor | None = None,
                      batch_size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of q(z|x) (or q(z|x, y) with `labels`) for float images (n, 784), a batch at a time;
    eval mode by the caller."""
    parts = [model.encoder(images[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
             for i in range(0, len(images), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image in nats: the seed's 784 * mean binary cross-entropy, from logits for stability.
    PyTorch's cross-entropy where autograd tracks the logits; otherwise (validation, the test metrics) the same
    sum by `reconstruction_nll_` on a copy, several times faster on a CPU."""
    if logits.requires_grad:
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)
    return reconstruction_nll_(logits.clone(), x)


def reconstruction_nll_(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`reconstruction_nll` without autograd, overwriting `logits` (..., 784) with sigmoid(|logits|); `x` holds
    the images, broadcast against the logits (many decoded samples of each image). The same sum,
    sum_j softplus(l_j) - x_j l_j, written as sum_j (1/2 - x_j) l_j + |l_j| / 2 - log sigmoid(|l_j|), in a few
    in-place passes: the importance-sampled bound decodes 50 million samples at K = 5000 and the training step
    55,000 an epoch, and softplus, or the cross-entropy with its temporaries and log1p, took longer than the
    matrix products on a CPU."""
    linear_part = torch.linalg.vecdot(logits, 0.5 - x)
    half_magnitude = logits.abs_().sum(dim=-1) / 2
    return linear_part + half_magnitude - _sum_of_logs_(logits.sigmoid_())


LOG_FACTORS = 64  # factors in [0.5, 1] multiplied before each logarithm: their product is at least 2**-64


def _sum_of_logs_(factors: torch.Tensor) -> torch.Tensor:
    """sum(log(factors)) over the last dimension for factors in [0.5, 1], overwriting them: the logarithms of
    products of up to 64 factors (the row folded onto itself in place, 784 columns to 13), since a logarithm
    costs far more than a multiplication; the products round as float32 sums of logarithms would."""
    width, count = factors.shape[-1], 1
    while width > 1 and 2 * count <= LOG_FACTORS:
        half = width // 2
        factors[..., :half].mul_(factors[..., width - half : width])
        width, count = width - half, 2 * count
    return factors[..., :width].log_().sum(dim=-1)


def negative_elbo(logits, x, mean, log_var) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(negative ELBO, reconstruction, KL) per image in nats; the seed's loss is the first / 1568."""
    reconstruction = reconstruction_nll(logits, x)
    kl = kl_to_standard_normal(mean, log_var)
    return reconstruction + kl, reconstruction, kl


def training_objective(reconstruction: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """What training minimises: reconstruction + kl_weight * KL (beta-VAE, KL warm-up). With weight 1 it is
    the negative ELBO, the seed's objective; the metrics are always the true negative ELBO."""
    return reconstruction + kl_weight * kl


def log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dimension."""
    return -0.5 * (((z - mean).square() / log_var.exp()) + log_var + math.log(2 * math.pi)).sum(dim=-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension: the prior's log density."""
    return -0.5 * (z.square() + math.log(2 * math.pi)).sum(dim=-1)


def objective_terms(model: VAE, x: torch.Tensor, labels: torch.Tensor | None, objective: str, samples: int,
                    kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training objective per image, with `samples` (k) reparameterised z per image, and the reconstruction
    (mean over the k) and KL of the true negative ELBO beside it; all (n,), in nats.

    `elbo` ("VAE, k"): the mean of the k samples' reconstruction terms plus kl_weight * KL in closed form
    (`training_objective`); at k = 1 the seed's objective. Burda et al. sample the KL too: the same expectation
    and gradient in expectation, with more variance.
    `iwae` (Burda et al. 2015): -log (1/k) sum_k w_k with log w_k = log p(x|z_k) + kl_weight * (log p(z_k) -
    log q(z_k|x)); at weight 1 the importance-weighted bound, whose gradient is sum_k w~_k grad log w_k with
    the normalised weights w~_k held constant (autograd of the logsumexp gives exactly that). The weight below 1
    (warm-up, beta) tempers the prior-to-posterior ratio as the ELBO's KL weight does."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    sampled = sample_posterior(model, x, labels, samples)
    kl = kl_to_standard_normal(sampled.mean, sampled.log_var)
    if objective == "elbo":
        loss = training_objective(sampled.reconstruction.mean(dim=0), kl, kl_weight)
    else:
        loss = math.log(samples) - torch.logsumexp(sampled.log_weights(kl_weight), dim=0)
    return loss, sampled.reconstruction.mean(dim=0), kl


@dataclass
class PosteriorSamples:
    """k reparameterised samples z (k, n, latent) of q(z|x) for n images, the posterior's mean and log-variance
    (n, latent), and each sample's reconstruction term -log p(x|z) (k, n)."""

    z: torch.Tensor
    mean: torch.Tensor
    log_var: torch.Tensor
    reconstruction: torch.Tensor

    def log_weights(self, kl_weight: float = 1.0) -> torch.Tensor:
        """log w = log p(x|z) + kl_weight * (log p(z) - log q(z|x)) of each sample (k, n): at weight 1 the
        importance weights, whose mean over the k is a one-sample ELBO with the KL sampled."""
        log_prior_ratio = log_standard_normal(self.z) - log_normal(self.z, self.mean, self.log_var)
        return -self.reconstruction + kl_weight * log_prior_ratio


def sample_posterior(model: VAE, x: torch.Tensor, labels: torch.Tensor | None, samples: int) -> PosteriorSamples:
    """`samples` draws of z from q(z|x) (or q(z|x, y)) for each image of x (n, 784), decoded in one batch."""
    mean, log_var = model.encoder(x, labels)
    z = reparameterize(mean.expand(samples, *mean.shape), log_var.expand(samples, *log_var.shape))
    repeated_labels = None if labels is None else labels.repeat(samples)
    logits = model.decoder(z.flatten(0, 1), repeated_labels).view(samples, len(x), -1)
    return PosteriorSamples(z, mean, log_var, reconstruction_nll(logits, x.expand(samples, *x.shape)))


@torch.no_grad()
def data_mean_logits(images: torch.Tensor) -> torch.Tensor:
    """The logit of each pixel's mean over `images` (n, 784), the means clipped to [0.001, 0.999] (Burda et al.'s
    `get_train_bias_np`): the output bias at which an untrained decoder already draws the average digit."""
    means = images.double().mean(dim=0).clamp(OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP)
    return torch.logit(means).to(images.dtype)


def resolve_device(name: str) -> torch.device:
    """The `device` parameter as a torch device: `auto` is the GPU where PyTorch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: device: 'cuda' was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    return torch.device(name)
