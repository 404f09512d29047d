"""A hand-written training step for the seed's VAE and its ELBO with one z sample per image: the same forward
pass and gradients as autograd of `vaelab.model.objective_terms` (up to float rounding), with far less overhead
per step. Other networks, objectives and sample counts train through autograd (`training.AutogradStep`).

Why: the model is small (batch 500, layers of 128-784 units), so a plain autograd step spends about half its
time outside the matrix products: per-op dispatch, graph bookkeeping, allocations and, above all, drawing
dropout masks. Here every layer's backward is written out with the same ATen kernels autograd would call
(`native_batch_norm_backward`, `threshold_backward`, `leaky_relu_backward`), gradients are written into
preallocated buffers, and the four dropout masks of a step come from one draw of random bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vaelab.model import (KERAS_BN, KERAS_LEAKY_SLOPE, SEED_LOSS_SCALE, VAE, linear, matmul_kernel,
                          reconstruction_nll_, with_label)

MASK_BITS = 16  # dropout keeps a unit when 16 random bits exceed round(p * 2**16): p to within 2**-17


@dataclass
class _Block:
    """Linear -> activation -> BatchNorm -> Dropout, and what its backward pass needs."""

    linear: nn.Linear
    norm: nn.BatchNorm1d
    leaky: bool
    kernel: str
    inputs: torch.Tensor | None = None
    activated: torch.Tensor | None = None
    batch_mean: torch.Tensor | None = None
    batch_invstd: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.inputs, self.mask = x, mask
        activation = "leaky_relu" if self.leaky else "relu"
        self.activated = linear(x, self.linear.weight, self.linear.bias, activation, self.kernel)
        normed, self.batch_mean, self.batch_invstd = torch.native_batch_norm(
            self.activated, self.norm.weight, self.norm.bias, self.norm.running_mean, self.norm.running_var,
            True, KERAS_BN["momentum"], KERAS_BN["eps"],
        )
        self.norm.num_batches_tracked.add_(1)
        return normed.mul_(mask)

    def backward(self, grad: torch.Tensor, need_input_grad: bool = True) -> torch.Tensor | None:
        grad = grad.mul_(self.mask)
        grad, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad, self.activated, self.norm.weight, self.norm.running_mean, self.norm.running_var,
            self.batch_mean, self.batch_invstd, True, KERAS_BN["eps"], [True, True, True],
        )
        self.norm.weight.grad.copy_(grad_gamma)
        self.norm.bias.grad.copy_(grad_beta)
        if self.leaky:
            grad = torch.ops.aten.leaky_relu_backward(grad, self.activated, KERAS_LEAKY_SLOPE, True)
        else:
            grad = torch.ops.aten.threshold_backward(grad, self.activated, 0)
        return _linear_backward(self.linear, self.inputs, grad, need_input_grad, self.kernel)


def _linear_backward(layer: nn.Linear, inputs, grad, need_input_grad: bool, kernel: str) -> torch.Tensor | None:
    """The layer's weight and bias gradients, and the gradient of its inputs. The weight gradient stays with
    torch.mm: its inner dimension is the batch, and oneDNN took up to four times as long for it (2-core EPYC)."""
    torch.mm(grad.t(), inputs, out=layer.weight.grad)
    torch.sum(grad, 0, out=layer.bias.grad)
    return linear(grad, layer.weight.t(), kernel=kernel) if need_input_grad else None


class FastStep:
    """One optimisation step's forward and backward on `model`, the seed's network or its conditional form, writing
    the gradients of the seed's loss (mean training objective / 1568: reconstruction + `kl_weight` * KL,
    `model.training_objective`) into each parameter's `.grad`. The model must be in training mode. `kernel` is the matrix-multiply kernel of the
    products (`vaelab.model.matmul_kernel`, the machine's choice by default)."""

    @staticmethod
    def covers(model: VAE, objective: str, samples: int) -> bool:
        """Whether this step computes the gradients of that training: the seed's network, the ELBO, one sample."""
        return model.config.architecture == "seed" and objective == "elbo" and samples == 1

    def __init__(self, model: VAE, kl_weight: float = 1.0, kernel: str | None = None):
        if not self.covers(model, "elbo", 1):
            raise ValueError(f"the hand-written step covers the seed's network, not {model.config.architecture}'s")
        encoder, decoder = model.encoder.body, model.decoder.net
        self.model = model
        self.kl_weight = kl_weight
        self.kernel = kernel or matmul_kernel(next(model.parameters()).device)
        self.blocks = [
            _Block(encoder[0], encoder[2], False, self.kernel), _Block(encoder[4], encoder[6], False, self.kernel),
            _Block(decoder[0], decoder[2], True, self.kernel), _Block(decoder[4], decoder[6], True, self.kernel),
        ]
        self.widths = [block.linear.out_features for block in self.blocks]
        self.output = decoder[8]
        dropped = round(model.config.dropout * 2**MASK_BITS)  # the rate, in steps of 2**-16
        self.keep_scale = 2**MASK_BITS / (2**MASK_BITS - dropped)  # so that a mask's mean is exactly 1
        self.threshold = dropped - 2 ** (MASK_BITS - 1)  # compared with bits read as signed int16
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        self._bits = self._keep = None

    def _masks(self, batch: int) -> list[torch.Tensor]:
        """The step's four dropout masks (0 or 1/(1-p)), from one draw of 64-bit random integers; views of a
        buffer that the next call overwrites."""
        count = batch * sum(self.widths)
        device = self.output.weight.device
        if not self.model.config.dropout:
            return [torch.ones(batch, width, device=device) for width in self.widths]
        if self._keep is None or len(self._keep) < count:  # buffers reused by every step: no fresh pages
            self._bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
            self._keep = torch.empty(count, dtype=self.output.weight.dtype, device=device)
        bits = self._bits.random_(-(2**63), 2**63 - 1).view(torch.int16)[:count]
        keep = torch.mul(bits >= self.threshold, self.keep_scale, out=self._keep[:count])
        return [m.view(batch, width) for m, width in zip(keep.split([batch * w for w in self.widths]), self.widths)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward on the batch `x` (n, 784), with its digit `labels` (n,) for a conditional VAE;
        returns the batch's summed (negative ELBO, reconstruction, KL, training objective) in nats, detached, for
        the epoch's statistics: the true ELBO's parts whatever `kl_weight` is, and what the step minimised."""
        config = self.model.config
        masks = self._masks(len(x))
        encoder_mean, encoder_log_var = self.model.encoder.mean, self.model.encoder.log_var
        scale = 1.0 / (len(x) * SEED_LOSS_SCALE)  # d(loss)/d(per-image reconstruction)

        h = self.blocks[1].forward(self.blocks[0].forward(with_label(x, labels, config), masks[0]), masks[1])
        # the heads' products are tiny: torch.mm, whose fixed cost per call is half oneDNN's
        mean = linear(h, encoder_mean.weight, encoder_mean.bias)
        log_var = linear(h, encoder_log_var.weight, encoder_log_var.bias)
        std = torch.exp(0.5 * log_var)
        eps = torch.randn_like(mean)
        z = torch.addcmul(mean, std, eps)
        d = self.blocks[3].forward(self.blocks[2].forward(with_label(z, labels, config), masks[2]), masks[3])
        logits = linear(d, self.output.weight, self.output.bias, kernel=self.kernel)

        variance = std.square()
        kl = -0.5 * torch.sum(1 + log_var - mean.square() - variance)
        grad_logits = torch.sigmoid(logits).sub_(x).mul_(scale)
        reconstruction = reconstruction_nll_(logits, x).sum()  # overwrites the logits
        grad_d = _linear_backward(self.output, d, grad_logits, True, self.kernel)
        # the decoder's input is z and, for a conditional VAE, the label's columns, which take no gradient
        grad_z = self.blocks[2].backward(self.blocks[3].backward(grad_d))[:, : config.latent_dim]
        kl_scale = scale * self.kl_weight  # d(loss)/d(per-image KL)
        grad_mean = torch.add(grad_z, mean, alpha=kl_scale)
        grad_log_var = (grad_z * eps * std).add_(variance - 1, alpha=kl_scale).mul_(0.5)
        grad_h = _linear_backward(encoder_mean, h, grad_mean, True, "mm")
        grad_h += _linear_backward(encoder_log_var, h, grad_log_var, True, "mm")
        self.blocks[0].backward(self.blocks[1].backward(grad_h), need_input_grad=False)
        return torch.stack([reconstruction + kl, reconstruction, kl, reconstruction + self.kl_weight * kl]).detach()
