"""The seed's VAE (Keras 2 tutorial, part 3) in PyTorch, and its objective.

Faithful to Keras 2's defaults where they differ from PyTorch's: Glorot-uniform weights and zero biases,
BatchNorm with momentum 0.99 (PyTorch: 0.01) and epsilon 1e-3, LeakyReLU slope 0.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import ParamsError

IMAGE_PIXELS = 28 * 28
SEED_LOSS_SCALE = 2 * IMAGE_PIXELS  # the seed divides the per-image negative ELBO by 2 * 28 * 28
KERAS_BN = dict(eps=1e-3, momentum=0.01)
KERAS_LEAKY_SLOPE = 0.3


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 2
    dropout: float = 0.3


def _dense(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _bn_dropout(width: int, dropout: float) -> list[nn.Module]:
    return [nn.BatchNorm1d(width, **KERAS_BN), nn.Dropout(dropout)]


class Encoder(nn.Module):
    """784 -> 256 ReLU -> BN -> Dropout -> 128 ReLU -> BN -> Dropout -> (mean, log-variance)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.body = nn.Sequential(
            _dense(IMAGE_PIXELS, 256), nn.ReLU(), *_bn_dropout(256, config.dropout),
            _dense(256, 128), nn.ReLU(), *_bn_dropout(128, config.dropout),
        )
        self.mean = _dense(128, config.latent_dim)
        self.log_var = _dense(128, config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mean(h), self.log_var(h)


class Decoder(nn.Module):
    """latent -> 128 LeakyReLU -> BN -> Dropout -> 256 LeakyReLU -> BN -> Dropout -> 784 logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            _dense(config.latent_dim, 128), nn.LeakyReLU(KERAS_LEAKY_SLOPE), *_bn_dropout(128, config.dropout),
            _dense(128, 256), nn.LeakyReLU(KERAS_LEAKY_SLOPE), *_bn_dropout(256, config.dropout),
            _dense(256, IMAGE_PIXELS),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits per pixel; `torch.sigmoid` of them is the seed's sigmoid output."""
        return self.net(z)


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
    """x @ weight.T + bias, then `activation` (`none`, `relu`, or `leaky_relu` with Keras's slope), with the
    matrix-multiply `kernel` (`matmul_kernel`): with oneDNN one call, the activation applied as the product is
    written."""
    if kernel == "onednn":
        slope = [KERAS_LEAKY_SLOPE] if activation == "leaky_relu" else []
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, slope, "")
    out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if activation == "relu":
        return out.relu_()
    return F.leaky_relu_(out, KERAS_LEAKY_SLOPE) if activation == "leaky_relu" else out


class FoldedDecoder:
    """An eval-mode decoder as three dense layers, each BatchNorm folded into the layer after it: in eval mode
    a BatchNorm is the affine map a * scale + shift, so W (a * scale + shift) + b = (W * scale) a + (W shift + b),
    and dropout is the identity. The same function up to float rounding, without two passes over the hidden
    units, for the importance-sampled bound's millions of decoded samples. A snapshot: build it anew after the
    weights change."""

    @torch.no_grad()
    def __init__(self, decoder: Decoder):
        net = decoder.net
        self.layers = [(net[0].weight, net[0].bias)]
        for norm, layer in ((net[2], net[4]), (net[6], net[8])):
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            self.layers.append((layer.weight * scale, torch.addmv(layer.bias, layer.weight, shift)))
        self.kernel = matmul_kernel(net[0].weight.device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (n, 784) of the latents z (n, latent_dim), as `Decoder.forward` in eval mode."""
        first, second, output = self.layers
        h = linear(z, *first, "leaky_relu", self.kernel)
        return linear(linear(h, *second, "leaky_relu", self.kernel), *output, kernel=self.kernel)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n, 784) in [0, 1] -> (decoder logits, mean, log-variance), one z sample per image."""
        mean, log_var = self.encoder(x)
        z = reparameterize(mean, log_var)
        return self.decoder(z), mean, log_var

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors (n, latent_dim) -> pixel intensities (n, 28, 28) in [0, 1]."""
        return torch.sigmoid(self.decoder(z)).reshape(-1, 28, 28)


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
def encode_in_batches(model: VAE, images: torch.Tensor, batch_size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of q(z|x) for float images (n, 784), a batch at a time; eval mode by the caller."""
    parts = [model.encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
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


def manifold_grid(size: int = 15) -> torch.Tensor:
    """The seed's grid: norm.ppf(linspace(0.05, 0.95, size)) on each axis."""
    return torch.special.ndtri(torch.linspace(0.05, 0.95, size, dtype=torch.float64)).float()


def manifold_latents(latent_dim: int, size: int = 15) -> torch.Tensor:
    """(size*size, latent_dim) latents: row i varies the second dimension, column j the first; others 0."""
    grid = manifold_grid(size)
    z = torch.zeros(size * size, latent_dim)
    z[:, 0] = grid.repeat(size)
    if latent_dim > 1:
        z[:, 1] = grid.repeat_interleave(size)
    return z


def resolve_device(name: str) -> torch.device:
    """The `device` parameter as a torch device: `auto` is the GPU where PyTorch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: device: 'cuda' was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    return torch.device(name)


def save_vae(model: VAE, path) -> None:
    """Weights and their config in one file that `torch.load(..., weights_only=True)` reads."""
    config = {"latent_dim": model.config.latent_dim, "dropout": model.config.dropout}
    torch.save({"config": config, "state_dict": model.state_dict()}, path)


def load_vae(path) -> VAE:
    """A saved VAE in eval mode, loaded weights-only (no pickled code runs)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = VAE(ModelConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
