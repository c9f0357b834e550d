"""Sharpness: the HVP power iteration against an explicit Hessian, and the stability limits
against the optimizers themselves on a quadratic."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from gradlab import sharpness

torch.manual_seed(0)


def tiny_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def explicit_hessian(model, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(v):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def dominant(eigenvalues: torch.Tensor) -> float:
    return float(eigenvalues[eigenvalues.abs().argmax()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_matches_the_explicit_hessian(seed):
    model, x, y = tiny_problem(seed)
    expected = dominant(torch.linalg.eigvalsh(explicit_hessian(model, x, y)))
    grads, hvp = sharpness.loss_hvp(model, x, y)
    lam, v = sharpness.power_iteration(hvp, sharpness.random_vector(grads, torch.Generator().manual_seed(1)), 100)
    assert float(lam) == pytest.approx(expected, rel=0.01)
    # the eigenvector: H v = lambda v
    hv = torch.cat([t.flatten() for t in hvp(v)])
    assert torch.allclose(hv, float(lam) * torch.cat([t.flatten() for t in v]), atol=1e-3 * abs(expected))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_finds_the_top_eigenpair_with_few_products(seed):
    """The cold start: Lanczos with COLD_PRODUCTS products against the explicit Hessian's top eigenvalue
    (the largest, not the largest in magnitude: the one that drives the update's runaway)."""
    model, x, y = tiny_problem(seed)
    expected = float(torch.linalg.eigvalsh(explicit_hessian(model, x, y))[-1])
    grads, hvp = sharpness.loss_hvp(model, x, y)
    lam, v = sharpness.lanczos(hvp, sharpness.random_vector(grads, torch.Generator().manual_seed(1)),
                               sharpness.COLD_PRODUCTS)
    assert float(lam) == pytest.approx(expected, rel=0.01)
    assert float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in v]))) == pytest.approx(1.0, rel=1e-5)
    hv = torch.cat([t.flatten() for t in hvp(v)])
    assert torch.allclose(hv, float(lam) * torch.cat([t.flatten() for t in v]), atol=2e-2 * abs(expected))


def test_lanczos_on_products_that_blew_up_is_nan_not_an_error():
    grads = [torch.ones(3), torch.ones(2)]
    lam, v = sharpness.lanczos(lambda u: [t * math.inf for t in u], grads, 4)
    assert math.isnan(float(lam)) and len(v) == 2


def test_warm_start_needs_few_iterations():
    model, x, y = tiny_problem(0)
    grads, hvp = sharpness.loss_hvp(model, x, y)
    cold, v = sharpness.power_iteration(hvp, sharpness.random_vector(grads, torch.Generator().manual_seed(1)), 100)
    warm, _ = sharpness.power_iteration(hvp, v, 3)
    assert float(warm) == pytest.approx(float(cold), rel=1e-4)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h():
    model, x, y = tiny_problem(0)
    h = explicit_hessian(model, x, y)
    p_inv_sqrt = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    expected = dominant(torch.linalg.eigvals(torch.diag(p_inv_sqrt ** 2) @ h).real)
    grads, hvp = sharpness.loss_hvp(model, x, y)
    scale, i = [], 0
    for g in grads:
        scale.append(p_inv_sqrt[i:i + g.numel()].view(g.shape))
        i += g.numel()
    lam, _ = sharpness.power_iteration(sharpness.scaled(hvp, scale),
                                       sharpness.random_vector(grads, torch.Generator().manual_seed(1)), 200)
    assert float(lam) == pytest.approx(expected, rel=0.01)


def test_measure_leaves_the_model_buffers_grads_and_rng_alone():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = OmegaConf.create({"name": "sgd", "momentum": 0.0, "nesterov": False})
    m = sharpness.measure(model, opt, cfg, x, y, 0.1, 5)
    assert torch.isfinite(m.lambda_max)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- stability limits
def growth(make_opt, limit: float, factors=(0.98, 1.02), steps: int = 200, idle: int = 200) -> list:
    """On f(x) = sum_i c_i/2 x_i^2 with c_i = factor_i x ``limit`` (coordinate-wise optimizers: each
    coordinate is its own 1-d problem), |x_i(2T)| / |x_i(T)|: the asymptotic rate per coordinate. x starts
    at 1e-30 so the gradients stay far below Adam's / RMSprop's eps: the preconditioner stays put. The
    first ``idle`` steps see a zero gradient: Adam's bias correction has faded when the curvature starts
    (its first steps are larger: the limit is the asymptotic one)."""
    c = torch.tensor(factors, dtype=torch.float64) * limit
    x = torch.full((len(factors),), 1e-30, dtype=torch.float64, requires_grad=True)
    opt = make_opt([x])
    seen = []
    for t in range(idle + 2 * steps):
        opt.zero_grad()
        (0.5 * c * x.pow(2) * (t >= idle)).sum().backward()
        opt.step()
        if t + 1 in (idle + steps, idle + 2 * steps):
            seen.append(x.detach().abs())
    return (seen[1] / seen[0]).tolist()


def separates(make_opt, limit: float) -> bool:
    """Just below the limit the iterate shrinks, just above it grows."""
    below, above = growth(make_opt, limit)
    return below < 1 < above


SGD_CASES = {
    "plain": {"momentum": 0.0, "nesterov": False},
    "momentum 0.9": {"momentum": 0.9, "nesterov": False},
    "nesterov 0.9": {"momentum": 0.9, "nesterov": True},
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_limit_separates_convergence_from_divergence(case):
    lr = 0.1
    cfg = OmegaConf.create({"name": "sgd", **SGD_CASES[case]})
    limit = sharpness.stability_limit(cfg, lr)
    make = lambda ps: torch.optim.SGD(ps, lr=lr, **SGD_CASES[case])  # noqa: E731
    assert separates(make, limit)


def test_adam_limit_on_the_preconditioned_curvature():
    """With eps far above sqrt(v), Adam's preconditioner is frozen at P = eps: its step is heavy
    ball on curvature lambda / eps, stable below (2 + 2 b1) / ((1 - b1) lr)."""
    lr, eps = 0.01, 1e3
    cfg = OmegaConf.create({"name": "adam", "betas": [0.9, 0.999], "eps": eps})
    limit = sharpness.stability_limit(cfg, lr)
    assert limit == pytest.approx(38 / lr)
    make = lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=eps)  # noqa: E731
    assert separates(make, limit * eps)


def test_rmsprop_limit_with_momentum():
    lr, eps = 0.01, 1e3
    cfg = OmegaConf.create({"name": "rmsprop", "momentum": 0.5, "eps": eps})
    limit = sharpness.stability_limit(cfg, lr)
    assert limit == pytest.approx(3 / lr)
    make = lambda ps: torch.optim.RMSprop(ps, lr=lr, momentum=0.5, eps=eps)  # noqa: E731
    assert separates(make, limit * eps)
