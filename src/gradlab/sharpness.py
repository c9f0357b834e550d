"""Sharpness: the top Hessian eigenvalue of the training loss, and the optimizer's stability limit.

Gradient descent on a quadratic with curvature lambda diverges once lambda exceeds a limit set
by the optimizer and its learning rate (2/lr for plain SGD). Near a minimum a network's loss is
such a quadratic along the Hessian's top eigenvector, so ``lambda_max / limit`` > 1 says the
next updates grow along that direction instead of shrinking (Cohen et al. 2021, "edge of
stability"). For Adam-type optimizers the relevant curvature is the preconditioned one,
lambda_max(P^-1 H) with P = diag(sqrt(v_hat) + eps), against (2 + 2 beta1) / ((1 - beta1) lr)
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

lambda_max comes from Hessian-vector products (torch.func: a vjp of the gradient, i.e. double
backward; no Hessian is ever formed): Lanczos from a random start (``COLD_PRODUCTS``), power
iteration from a previous eigenvector (a warm start needs few products). Every product is device
work only, so the estimate is read back with the rest of the telemetry, never on its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

Vector = List[torch.Tensor]
COLD_PRODUCTS = 10  # Lanczos products from a random start: as close as 20 power iterations or closer (README)


def native_kernels():
    """cuDNN's RNN kernels support neither torch.func transforms nor double backward; what
    differentiates twice (the gauge, the preflight, per-sample gradients) runs torch's own kernels
    (the same arithmetic up to rounding) inside this context. No effect on the CPU."""
    return torch.backends.cudnn.flags(enabled=False, benchmark=False,
                                      deterministic=torch.backends.cudnn.deterministic)


# ---------------------------------------------------------------- stability limits
def stability_limit(cfg_opt, lr: float) -> float:
    """The largest (preconditioned) curvature the optimizer's update is stable on, at learning rate ``lr``.

    SGD (heavy ball, torch's form buf = b*buf + g): (2 + 2b) / lr; Nesterov: (2 + 2b) / ((1 + 2b) lr).
    RMSprop: the same on P^-1 H (torch's momentum acts on the preconditioned step).
    Adam/AdamW/StableAdamW: m is an average with weight (1 - b1), so the step is heavy ball at lr (1 - b1):
    (2 + 2 b1) / ((1 - b1) lr), on P^-1 H.
    """
    if cfg_opt.name in ("adam", "adamw", "stable_adamw"):
        b1 = float(cfg_opt.betas[0])
        return (2 + 2 * b1) / ((1 - b1) * lr)
    b = float(cfg_opt.momentum)
    if cfg_opt.name == "sgd" and cfg_opt.nesterov:
        return (2 + 2 * b) / ((1 + 2 * b) * lr)
    return (2 + 2 * b) / lr


def preconditioned(cfg_opt) -> bool:
    """Whether the optimizer's stability is judged on P^-1 H (Adam-type) rather than on H."""
    return cfg_opt.name != "sgd"


def preconditioner(optimizer: torch.optim.Optimizer, params: List[nn.Parameter], cfg_opt,
                   squared_grads: Vector) -> Optional[Vector]:
    """P^-1/2 per parameter, from the optimizer's second-moment state (bias-corrected for Adam);
    before the first step, from ``squared_grads`` (one batch's: what Adam's first step divides by).
    None for SGD. Device ops only (Adam's step counter is a tensor)."""
    if not preconditioned(cfg_opt):
        return None
    eps = float(cfg_opt.eps)
    out = []
    for p, g2 in zip(params, squared_grads):
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            beta2 = float(cfg_opt.betas[1])
            v = state["exp_avg_sq"] / (1 - beta2 ** state["step"].to(state["exp_avg_sq"].device))
        elif "square_avg" in state:
            v = state["square_avg"]
        else:
            v = g2
        out.append((v.sqrt() + eps).rsqrt())
    return out


# ---------------------------------------------------------------- power iteration
def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def _normalized(v: Vector) -> Vector:
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
    return torch._foreach_div(v, norm.clamp(min=1e-30))


def random_vector(like: Vector, generator: Optional[torch.Generator] = None) -> Vector:
    """A unit vector shaped like ``like`` (drawn on the CPU from ``generator``, so the training RNG is untouched)."""
    return _normalized([torch.randn(t.shape, generator=generator).to(t.device, t.dtype) for t in like])


def power_iteration(hvp: Callable[[Vector], Vector], v0: Vector, iters: int) -> tuple[torch.Tensor, Vector]:
    """The dominant eigenvalue (largest magnitude; for a network's loss at the scales that matter, the
    top positive one) and its eigenvector, from ``iters`` products with the symmetric operator ``hvp``,
    starting at ``v0`` (a previous eigenvector: a warm start needs few iterations). Returns the
    Rayleigh quotient v.Hv of the last unit vector, a device scalar (NaN if the products are)."""
    v = _normalized(v0)
    lam = torch.zeros((), device=v[0].device)
    for _ in range(iters):
        hv = hvp(v)
        lam = _dot(v, hv)
        v = _normalized(hv)
    return lam, v


def _top_eigenpair(t: torch.Tensor, squarings: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The algebraically largest eigenvalue of the small symmetric ``t`` and a unit eigenvector, by repeated
    squaring of t + c I (c = ||t||_F >= its spectral radius, so the top eigenvalue dominates): device
    ops only, where torch.linalg.eigh would read its error code back to the host."""
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    a = t + torch.linalg.matrix_norm(t) * eye
    for _ in range(squarings):
        a = a @ a
        a = a / a.abs().amax().clamp(min=1e-30)
    y = torch.index_select(a, 1, torch.linalg.vector_norm(a, dim=0).argmax().view(1)).squeeze(1)
    y = y / torch.linalg.vector_norm(y).clamp(min=1e-30)
    return y @ t @ y, y


def lanczos(hvp: Callable[[Vector], Vector], v0: Vector, steps: int) -> tuple[torch.Tensor, Vector]:
    """The top eigenvalue and its eigenvector from ``steps`` products with the symmetric operator ``hvp``,
    starting at ``v0``: the largest Ritz value of the Krylov space (Lanczos), which converges much faster
    than power iteration from a random start (README, "Foresight": 10 products for the accuracy of 20
    power iterations). The three-term recurrence without re-orthogonalization: over 10 float32 steps it
    gave the fully re-orthogonalized values to 0.01% (mlp, cnn, rnn; two seeds each), at about half the
    cost on the MLP (a projection on every earlier vector is a pass over all the parameters). Holds ``steps`` vectors. Device work
    only; NaN if the products are."""
    v = _normalized(v0)
    basis, alphas, betas = [v], [], []
    for j in range(steps):
        w = hvp(basis[-1])
        alphas.append(_dot(w, basis[-1]))
        w = torch._foreach_sub(w, torch._foreach_mul(basis[-1], alphas[-1]))
        if j:
            w = torch._foreach_sub(w, torch._foreach_mul(basis[-2], betas[-1]))
        if j < steps - 1:
            betas.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(w))))
            basis.append(torch._foreach_div(w, betas[-1].clamp(min=1e-30)))
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    finite = torch.isfinite(t).all()
    lam, y = _top_eigenpair(torch.where(torch.isfinite(t), t, torch.zeros_like(t)).double())
    lam = torch.where(finite, lam.float(), torch.full_like(lam.float(), float("nan")))
    y = y.to(v[0].dtype)
    vec = [sum(y[i] * b[k] for i, b in enumerate(basis)) for k in range(len(v))]
    return lam, _normalized(vec)


# ---------------------------------------------------------------- Hessian-vector products
@contextlib.contextmanager
def batch_statistics_only(model: nn.Module):
    """Training-mode BatchNorm normalizes with the batch's statistics, as in the step, without updating
    its running statistics (a buffer update inside a torch.func transform is refused, and the
    measurement must leave the model as it was)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def loss_hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             label_smoothing: float = 0.0) -> tuple[Vector, Callable[[Vector], Vector]]:
    """(gradient, v -> H v) of the cross-entropy loss on (x, y) at the model's current weights.
    The gradient's graph is built once; each product is one more backward pass through it.
    Buffers are passed as copies, so a BatchNorm's running statistics are not updated."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(p: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x,))
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)

    with batch_statistics_only(model):
        g, vjp_fn = vjp(grad(loss), params)

    def hvp(v: Vector) -> Vector:
        hv = vjp_fn(dict(zip(names, v)))[0]
        return [hv[n] for n in names]

    return [g[n] for n in names], hvp


def scaled(hvp: Callable[[Vector], Vector], scale: Optional[Vector]) -> Callable[[Vector], Vector]:
    """v -> S H S v with S = diag(``scale``): with S = P^-1/2 its eigenvalues are those of P^-1 H."""
    if scale is None:
        return hvp
    return lambda v: torch._foreach_mul(hvp(torch._foreach_mul(v, scale)), scale)


@dataclass
class Sharpness:
    lambda_max: torch.Tensor  # device scalar: the (preconditioned) top eigenvalue
    limit: float  # the optimizer's stability limit at this learning rate
    vector: Vector  # the eigenvector (the next measurement's warm start)
    grads: Vector  # the loss gradient at the measured weights

    @property
    def ratio(self) -> torch.Tensor:
        return self.lambda_max / self.limit


def measure(model: nn.Module, optimizer: torch.optim.Optimizer, cfg_opt, x: torch.Tensor, y: torch.Tensor,
            lr: float, iters: int, v0: Optional[Vector] = None, label_smoothing: float = 0.0,
            generator: Optional[torch.Generator] = None) -> Sharpness:
    """lambda_max (of P^-1 H for Adam-type optimizers) on (x, y) against the stability limit at ``lr``:
    ``iters`` power iterations warm-started at ``v0``, or without it COLD_PRODUCTS Lanczos products from a
    random start. Leaves the model, its buffers and the RNG as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type):  # dropout masks: no trace
        grads, hvp = loss_hvp(model, x, y, label_smoothing)
        hvp = scaled(hvp, preconditioner(optimizer, params, cfg_opt, [g.detach() ** 2 for g in grads]))
        lam, v = (power_iteration(hvp, v0, iters) if v0 is not None
                  else lanczos(hvp, random_vector(grads, generator), COLD_PRODUCTS))
    return Sharpness(lam.detach(), stability_limit(cfg_opt, lr), [t.detach() for t in v], [g.detach() for g in grads])
