"""On-the-fly gradient modulation (OGM, OGM-GE; Peng et al., CVPR 2022) and on-the-fly prediction
modulation (OPM; Wei et al., TPAMI 2024).

Both read the imbalance from the confidence ratio ``rho_m = s_m / mean_{j != m} s_j`` of the summed
true-class probabilities ``s_m`` (see :mod:`poise.functional.confidence`); for two modalities this is
the paper's ``rho_a = s_a / s_v``. Every modality with ``rho_m > 1`` counts as dominant (for two
modalities: exactly the one with the larger score; at a tie neither is).

- OGM scales the gradients of a dominant modality's encoder by
  ``k_m = 1 - tanh(alpha * relu(rho_m))`` (the paper's Eq. 10 and the released code; ``k`` jumps from 1
  to ``1 - tanh(alpha)`` as ``rho`` crosses 1) or ``1 - tanh(alpha * relu(rho_m - 1))`` (continuous at 1,
  a variant of poise's own), and ``k = 1`` for the others. GE adds ``N(0, std(g) + 1e-8)`` noise, ``std`` of the unscaled gradient, to every modulated
  tensor of every encoder.
- OPM drops the features of a dominant modality per sample with probability
  ``q_m = q_base * (1 + lambda * tanh(relu(rho_m - 1)))`` (clipped to [0, 1]; 0 for the others) and
  rescales the fused input by ``1 / (1 - theta)``, ``theta = sum_m d_m q_m / sum_m d_m``.

The tensor functions never leave the device (no ``.item()``), so they are safe in the training step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from torch import Tensor, nn

from poise.functional.confidence import confidence_ratios, confidence_scores

GE_EPS = 1e-8

ModulatedParameters = Literal["weights", "conv", "all"]


# ---- OGM -----------------------------------------------------------------------------------------
def modulation_coefficients(ratios: Tensor, alpha: float, continuous: bool = False) -> Tensor:
    """(M,) confidence ratios -> (M,) gradient coefficients.

    ``k_m = 1 - tanh(alpha * relu(rho_m))`` where ``rho_m > 1`` (paper's Eq. 10 and released code), or with
    ``rho_m - 1`` inside the relu when ``continuous`` (poise's variant); ``k_m = 1`` elsewhere.
    """
    excess = ratios - 1.0 if continuous else ratios
    slowed = 1.0 - torch.tanh(alpha * torch.relu(excess))
    return torch.where(ratios > 1.0, slowed, torch.ones_like(slowed))


def stack_ratios(scores: dict[str, Tensor]) -> Tensor:
    """(M,) confidence ratios in the order of ``scores``."""
    ratios = confidence_ratios(scores)
    return torch.stack([ratios[m] for m in scores])


def ogm_coefficients(
    unimodal_logits: dict[str, Tensor], labels: Tensor, alpha: float, continuous: bool = False
) -> dict[str, float]:
    """The OGM coefficient of each modality for one batch (a convenience for custom loops and for
    inspection; the training step uses the tensor form :func:`modulation_coefficients`)."""
    if len(unimodal_logits) < 2:
        raise ValueError(f"OGM compares modalities and needs at least two, got {len(unimodal_logits)}")
    scores = confidence_scores(unimodal_logits, labels)
    coefficients = modulation_coefficients(stack_ratios(scores), alpha, continuous)
    return {m: float(k) for m, k in zip(scores, coefficients.tolist())}


#: layer types whose parameters are normalisation statistics' affine terms, never modulated
NORMALISATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def select_modulated_parameters(encoder: nn.Module, mode: ModulatedParameters = "weights") -> list[nn.Parameter]:
    """The parameters of one encoder whose gradients OGM modulates, chosen by layer type and tensor rank
    (never by parameter name).

    ``weights`` (default): every weight tensor of the encoder -- convolutions, linear layers (a projection
    after convolutions included), recurrent and embedding weights: the parameters with two or more
    dimensions of every layer that is not a normalisation layer; never biases (1-D) nor normalisation
    parameters. In the released ResNet-18 encoders this is exactly the set the released rule selects.
    ``conv``: the literal released rule, the 4-D (2-D convolution) weights only (``len(grad.shape) == 4``):
    a final linear projection is left alone, and an encoder without convolutions gets nothing.
    ``all``: every trainable parameter of the encoder.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(
            "select_modulated_parameters takes the encoder module (its layer types tell weights from "
            f"normalisation parameters), got {type(encoder).__name__}"
        )
    if mode not in ("weights", "conv", "all"):
        raise ValueError(f"unknown parameter selection '{mode}' (expected 'weights', 'conv' or 'all')")
    if mode == "all":
        return [p for p in encoder.parameters() if p.requires_grad]
    selected: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in encoder.modules():
        if isinstance(module, NORMALISATION_LAYERS):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            if (p.dim() == 4) if mode == "conv" else (p.dim() >= 2):
                seen.add(id(p))
                selected.append(p)
    return selected


def ge_noise(grad: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise shaped like ``grad`` with standard deviation ``std(grad) + 1e-8`` (one scalar per
    tensor, the unbiased std as ``torch.std`` computes it)."""
    std = grad.std() if grad.numel() > 1 else grad.new_zeros(())
    noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
    return noise * (std + GE_EPS)


#: elements of noise drawn at a time: one piece stays in cache while it is added to its gradient, so no
#: full-size noise tensor is ever allocated, and pieces are drawn in parallel on the CPU
NOISE_PIECE = 1 << 18

_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}


def _noise_buffer(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's reusable noise buffer, at least ``n`` elements."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(max(n, NOISE_PIECE), dtype=dtype, device=device)
    return buf[:n]


def _add_piece(piece: Tensor, k: Tensor, std: Tensor | float, seed: int) -> None:
    """``piece <- k * piece + std * N(0, 1)`` with noise from a generator seeded for this piece alone."""
    gen = getattr(_local, "generator", None)
    if gen is None:
        gen = _local.generator = torch.Generator()
    gen.manual_seed(seed)
    noise = _noise_buffer(piece.numel(), piece.dtype, piece.device).view(piece.shape).normal_(generator=gen)
    if isinstance(std, Tensor):
        piece.mul_(k).addcmul_(noise, std)
    else:
        piece.mul_(k).add_(noise, alpha=std)


#: a tensor whose |mean| exceeds this many standard deviations gets its std from ``torch.std``: the one-pass
#: form would lose digits to cancellation there (gradients are nowhere near it)
STD_CANCELLATION = 10.0


def gradient_stds(grads: Sequence[Tensor]) -> list[Tensor | float]:
    """Each tensor's unbiased standard deviation, as ``torch.std`` computes it (0 for a single element).

    On the CPU (float32 and float64 tensors) from every tensor's sum and 2-norm, two fused reads that cost
    about a fifth of ``torch.std``, combined in float64 as ``(sum x^2 - (sum x)^2 / n) / (n - 1)`` and read back
    as Python floats (there is no device to wait for). A tensor whose mean is large against its spread
    (``STD_CANCELLATION``) or whose sums are not finite gets ``torch.std`` instead. Elsewhere ``torch.std`` per
    tensor, left on the device."""
    grads = list(grads)
    if not grads:
        return []
    if grads[0].device.type != "cpu" or any(g.dtype not in (torch.float32, torch.float64) for g in grads):
        return [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads]
    norms = torch.stack([v.double() for v in torch._foreach_norm(grads)]).numpy().tolist()
    sums = torch.stack([g.sum().double() for g in grads]).numpy().tolist()
    out: list[Tensor | float] = []
    for g, norm, total in zip(grads, norms, sums):
        n = g.numel()
        if n < 2:
            out.append(0.0)
            continue
        mean = total / n
        spread = norm * norm / n - mean * mean  # the biased variance
        if math.isfinite(spread) and spread * STD_CANCELLATION**2 >= mean * mean:
            out.append(math.sqrt(spread * n / (n - 1)))
        else:
            out.append(g.std())
    return out


def scale_and_add_noise_(grads: Sequence[Tensor], k: Tensor, stds: Sequence[Tensor | float],
                         generator: torch.Generator | None = None) -> None:
    """In place: ``g_i <- k * g_i + stds[i] * N(0, 1)`` (i.i.d. standard normal noise), piece by piece.

    On the CPU, torch draws normal numbers on one thread; here every piece of ``NOISE_PIECE`` elements has
    its own generator, seeded from one draw of ``generator`` per piece, so the pieces are drawn on
    ``torch.get_num_threads()`` threads at once and the noise still depends only on ``generator``'s state
    (not on the number of threads). Elsewhere (CUDA) the device draws in parallel anyway: ``generator``
    fills one reused piece after the other."""
    pieces: list[tuple[Tensor, Tensor | float]] = []
    for g, s in zip(grads, stds):
        flat = g.view(-1) if g.is_contiguous() else None
        if flat is None:  # a non-contiguous gradient: one piece, the whole tensor
            pieces.append((g, s))
            continue
        pieces += [(flat[i: i + NOISE_PIECE], s) for i in range(0, flat.numel(), NOISE_PIECE)]
    if not pieces:
        return
    if pieces[0][0].device.type != "cpu":
        for piece, s in pieces:
            noise = _noise_buffer(piece.numel(), piece.dtype, piece.device).view(piece.shape).normal_(generator=generator)
            if isinstance(s, Tensor):
                piece.mul_(k).addcmul_(noise, s)
            else:
                piece.mul_(k).add_(noise, alpha=s)
        return
    # drawn on the CPU generator into a CPU array: reading the seeds never waits for a device
    seeds = torch.randint(2**62, (len(pieces),), generator=generator).numpy().tolist()
    workers = max(1, min(torch.get_num_threads(), len(pieces)))
    tasks = [(piece, s, seed) for (piece, s), seed in zip(pieces, seeds)]
    if workers == 1:
        _add_pieces(tasks, k)
        return
    pool = _pools.get(workers - 1)
    if pool is None:
        pool = _pools[workers - 1] = ThreadPoolExecutor(workers - 1, thread_name_prefix="poise-noise")
    # one share per thread (every workers-th piece: equal work), this thread taking the first
    futures = [pool.submit(_add_pieces, tasks[w::workers], k) for w in range(1, workers)]
    _add_pieces(tasks[0::workers], k)
    for future in futures:
        future.result()


def _add_pieces(tasks: list[tuple[Tensor, Tensor | float, int]], k: Tensor) -> None:
    for piece, s, seed in tasks:
        _add_piece(piece, k, s, seed)


def modulate_gradients(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """In place: ``g <- k_m * g`` for every parameter of ``groups[m]`` (with ``noise``: ``+ N(0, std(g) +
    1e-8)``, the std taken before the scaling by :func:`gradient_stds`, drawn by :func:`scale_and_add_noise_`).
    Parameters without a gradient are skipped."""
    for m, params in enumerate(groups):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        k = coefficients[m].to(grads[0].dtype)
        if not noise:
            torch._foreach_mul_(grads, k)
            continue
        stds = [s + GE_EPS for s in gradient_stds(grads)]
        scale_and_add_noise_(grads, k, stds, generator)


# ---- OPM -----------------------------------------------------------------------------------------
def opm_drop_probabilities(ratios: Tensor, q_base: float = 0.5, lam: float = 0.5) -> Tensor:
    """(M,) ratios -> (M,) drop probabilities: ``q_base * (1 + lam * tanh(relu(rho - 1)))`` clipped to
    [0, 1] for a dominant modality (``rho > 1``), 0 for the others."""
    dominant = q_base * (1.0 + lam * torch.tanh(torch.relu(ratios - 1.0)))
    q = torch.where(ratios > 1.0, dominant, torch.zeros_like(dominant))
    return q.clamp(0.0, 1.0)


def opm_theta(q: Tensor, feature_dims: Tensor) -> Tensor:
    """``theta = sum_m d_m q_m / sum_m d_m``: the expected dropped share of the fused input."""
    dims = feature_dims.to(q.dtype)
    return (dims * q).sum() / dims.sum()


def opm_keep_mask(q: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, M) bool: sample i keeps modality m with probability ``1 - q_m``, independently."""
    u = torch.rand(batch_size, q.shape[0], generator=generator, device=q.device)
    return u < (1.0 - q)


def opm_feature_scale(keep: Tensor, theta: Tensor) -> Tensor:
    """(B, M) feature multipliers: 0 for a dropped modality, ``1 / (1 - theta)`` for a kept one."""
    return keep.to(theta.dtype) / (1.0 - theta).clamp_min(1e-6)


def opm_loss_rows(keep: Tensor, present: Tensor) -> Tensor:
    """(B,) bool: the samples that still have at least one modality after dropping (the others leave
    the loss)."""
    return (keep & present).any(dim=1)


__all__ = [
    "GE_EPS",
    "NORMALISATION_LAYERS",
    "ge_noise",
    "gradient_stds",
    "modulate_gradients",
    "modulation_coefficients",
    "ogm_coefficients",
    "scale_and_add_noise_",
    "opm_drop_probabilities",
    "opm_feature_scale",
    "opm_keep_mask",
    "opm_loss_rows",
    "opm_theta",
    "select_modulated_parameters",
    "stack_ratios",
]
