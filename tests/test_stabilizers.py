"""Gradient stabilizers: exact against torch and the paper formulas, no host sync on the
step path, fp16's unscale before any stabilizer, and state that survives a checkpoint.

References are written here from ../shared/reference/stabilizers.md in plain Python/numpy,
never by calling the implementation."""
from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import client, compose, tiny_cfg
from gradlab import checkpoint
from gradlab.config import ConfigError, check
from gradlab.registry import STABILIZERS
from gradlab.stabilizers import StabilizerStack
from gradlab.telemetry import DivergenceWatch
from gradlab.training import Trainer, train

CPU = torch.device("cpu")
INF = math.inf


class Params(nn.Module):
    """Random parameters of the given shapes, named ``ps.0``, ``ps.1``, ..."""

    def __init__(self, shapes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g)) for s in shapes])


def stack_of(cfg: dict, model: nn.Module) -> StabilizerStack:
    """The stack for {name: knobs}; knobs not given take their schema defaults."""
    return StabilizerStack({n: {**asdict(STABILIZERS[n].schema()), **k} for n, k in cfg.items()}, model, CPU)


def l2(tensors) -> float:
    return float(np.linalg.norm(np.concatenate([t.detach().double().numpy().ravel() for t in tensors])))


# ================================================================ A. exactness
# ---------------------------------------------------------------- clip == torch.nn.utils.clip_grad_norm_
SHAPES = {"vector": [(7,)], "mixed": [(3, 4), (4,), (2, 3, 5, 5)], "odd": [(1,), (10, 1), (1, 10), (6, 6, 3)]}


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("scale", [0.01, 0.3, 100.0])  # no clip, around max_norm, heavy clip
def test_clip_matches_torch_clip_grad_norm(norm_type, shapes, scale):
    model = Params(SHAPES[shapes], seed=len(shapes))
    g = torch.Generator().manual_seed(int(scale * 100))
    grads = [torch.randn(p.shape, generator=g) * scale for p in model.parameters()]
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for r, gr in zip(ref, grads):
        r.grad = gr.clone()
    ref_total = float(torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type))

    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    gs = stack_of({"clip": {"max_norm": 1.0, "norm_type": norm_type}}, model).process(torch.tensor(0.0))

    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-6)
    # telemetry reports L2 norms before and after; their ratio is torch's coefficient
    pre, post = float(gs.pre_norm), float(gs.current_norm())
    assert pre == pytest.approx(l2(grads), rel=1e-6)
    assert post == pytest.approx(l2(r.grad for r in ref), rel=1e-6)
    assert post / pre == pytest.approx(min(1.0, 1.0 / (ref_total + 1e-6)), rel=1e-6)
    if norm_type == 2.0:
        assert pre == pytest.approx(ref_total, rel=1e-6)  # the value clip_grad_norm_ returns
    p_after = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type))
    assert p_after <= 1.0 + 1e-5


@pytest.mark.parametrize("first", [{"clip_value": {"clip_value": 0.5}},
                                   {"agc": {"clipping": 0.01, "eps": 1e-3, "exclude": ["auto"]}}])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_post_norm_after_a_transform_then_clip(first, norm_type):
    """The reported post-clip norm is the L2 norm of the gradients actually applied, also when
    an earlier transform made the cached norm stale (this once applied the coefficient twice)."""
    model = Params(SHAPES["mixed"], seed=3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    gs = stack_of({**first, "clip": {"max_norm": 0.01, "norm_type": norm_type}}, model).process(torch.tensor(0.0))
    grads = [p.grad for p in model.parameters()]
    assert float(torch.nn.utils.get_total_norm(grads, norm_type)) == pytest.approx(0.01, rel=1e-4)  # it clipped
    assert float(gs.current_norm()) == pytest.approx(l2(p.grad for p in model.parameters()), rel=1e-6)
    assert gs.modified


def test_clip_nonfinite_gradient_is_left_nonfinite():
    """gradlab clips like torch (error_if_nonfinite=False): an inf norm gives coefficient 0, so
    finite entries become 0 and inf entries NaN. The post norm is then non-finite, so the step
    is recorded as such and the run diverges unless spike_skip or fp16's scaler skipped it."""
    model = Params([(3,), (2, 2)], seed=1)
    grads = [torch.tensor([1.0, INF, -2.0]), torch.ones(2, 2)]
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p, r, gr in zip(model.parameters(), ref, grads):
        p.grad, r.grad = gr.clone(), gr.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    gs = stack_of({"clip": {"max_norm": 1.0, "norm_type": 2.0}}, model).process(torch.tensor(0.0))
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad, equal_nan=True)
    assert not math.isfinite(float(gs.pre_norm)) and not math.isfinite(float(gs.current_norm()))


@pytest.mark.parametrize("c", [0.05, 0.5, 5.0])
def test_clip_value_matches_torch_clip_grad_value(c):
    model = Params(SHAPES["mixed"], seed=5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ref = [p.grad.clone() for p in model.parameters()]
    for r in ref:
        r.clamp_(-c, c)
    gs = stack_of({"clip_value": {"clip_value": c}}, model).process(torch.tensor(0.0))
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p.grad, r)
    assert float(gs.current_norm()) == pytest.approx(l2(ref), rel=1e-6)
    assert gs.modified  # the direction changed: the coefficient is applied/raw, not 1


def test_warmup_ramps_linearly_then_holds():
    """lr_t = lr * (t+1)/N for t < N, then lr; multiplies the main schedule (here: step decay)."""
    from gradlab.optim import Schedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = compose(["stabilizer=warmup", "scheduler=step", "scheduler.gamma=0.5"]).scheduler
    schedule = Schedule(opt, sched, warmup_steps=4, total_steps=20, steps_per_epoch=6)
    lrs = []
    for _ in range(14):
        lrs.append(schedule.lr)
        opt.step()
        schedule.step()
    expected = [0.1 * min(t + 1, 4) / 4 * 0.5 ** (t // 6) for t in range(14)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)


# ---------------------------------------------------------------- AGC, on hand-built tensors
class AGCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.conv = nn.Conv2d(1, 2, 2)
        self.zero = nn.Linear(2, 2)  # zero-initialized: only the eps floor lets it learn
        self.head = nn.Linear(2, 2)  # final classifier: excluded by default


def agc_case():
    """(model with grads set, expected grads) for lambda=0.01, eps=1e-3, worked out by hand."""
    net = AGCNet()
    t = torch.tensor
    W = {  # name: (weight, grad, expected grad)
        # rows: ||W||=5 -> max .05, ||G||=.5 -> x.1 | ||W||=0 -> max 1e-5 (eps), ||G||=1 | ||W||=100 -> max 1 > ||G||
        "fc.weight": (t([[3.0, 4.0], [0.0, 0.0], [100.0, 0.0]]), t([[0.3, 0.4], [1.0, 0.0], [0.5, 0.5]]),
                      t([[0.03, 0.04], [1e-5, 0.0], [0.5, 0.5]])),
        # 1-D: one unit. ||b||=.1 -> max 1e-3; ||G||=.005 -> x.2
        "fc.bias": (t([0.1, 0.0, 0.0]), t([0.0, 0.003, 0.004]), t([0.0, 0.0006, 0.0008])),
        # 4-D: one unit per output channel. ch0: ||W||=2 -> max .02, ||G||=.2 -> x.1; ch1: W=0, ||G||=2e-6 < 1e-5
        "conv.weight": (torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]),
                        torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 1e-6)]),
                        torch.stack([torch.full((1, 2, 2), 0.01), torch.full((1, 2, 2), 1e-6)])),
        "conv.bias": (t([0.0, 0.0]), t([3e-6, 4e-6]), t([3e-6, 4e-6])),  # ||G||=5e-6 <= 1e-5: kept
        # zero init: row0 ||G||=5 -> clipped to norm 1e-5; row1 zero gradient stays zero
        "zero.weight": (torch.zeros(2, 2), t([[3.0, 4.0], [0.0, 0.0]]), t([[6e-6, 8e-6], [0.0, 0.0]])),
        "zero.bias": (torch.zeros(2), t([0.0, 2.0]), t([0.0, 1e-5])),
        "head.weight": (torch.ones(2, 2), torch.full((2, 2), 1000.0), torch.full((2, 2), 1000.0)),
        "head.bias": (torch.zeros(2), t([1000.0, -1000.0]), t([1000.0, -1000.0])),
    }
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, (w, g, _) in W.items():
            params[name].copy_(w)
            params[name].grad = g.clone()
    return net, {n: e for n, (_, _, e) in W.items()}


def test_agc_matches_formula_on_hand_built_tensors():
    net, expected = agc_case()
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    stack_of({"agc": {"clipping": 0.01, "eps": 1e-3, "exclude": ["auto"]}}, net).process(torch.tensor(0.0))
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-12, msg=name)
        assert torch.equal(p.detach(), weights[name])  # gradients only


def test_agc_floor_of_the_gradient_norm_and_exclusion():
    """G_i * max_i / max(||G_i||, 1e-6): with max_i < 1e-6 the floor makes the clip stronger;
    ``exclude: []`` clips the head too, an explicit prefix excludes that layer."""
    net, _ = agc_case()
    with torch.no_grad():
        net.zero.weight.grad.copy_(torch.tensor([[3e-7, 4e-7], [0.0, 0.0]]))  # ||G||=5e-7 > max 1e-7
        head_grad = net.head.weight.grad.clone()
        fc_grad = net.fc.weight.grad.clone()
    stack_of({"agc": {"clipping": 1e-4, "eps": 1e-3, "exclude": ["fc."]}}, net).process(torch.tensor(0.0))
    torch.testing.assert_close(net.zero.weight.grad, torch.tensor([[3e-8, 4e-8], [0.0, 0.0]]), rtol=1e-6, atol=0)
    assert torch.equal(net.fc.weight.grad, fc_grad)  # excluded by prefix
    # head.weight: ||W_i|| = sqrt(2) -> max 1.414e-4; ||G_i|| = 1414.2 -> G_i * 1e-7
    torch.testing.assert_close(net.head.weight.grad, head_grad * (1e-4 * math.sqrt(2) / (1000 * math.sqrt(2))),
                               rtol=1e-5, atol=0)


def test_agc_exclude_matches_whole_module_names():
    """Audit case: ``exclude=[blocks.1]`` also excluded blocks.10 and blocks.11 (a bare prefix)."""
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)  # far above 0.01 * ||W_i||: every included unit is clipped
    stack_of({"agc": {"exclude": ["blocks.1"]}}, net).process(torch.tensor(0.0))
    untouched = {n for n, p in net.named_parameters() if torch.equal(p.grad, torch.full_like(p, 100.0))}
    assert untouched == {"blocks.1.weight", "blocks.1.bias"}


# ---------------------------------------------------------------- AdaGC against its reference code
def adagc_reference(grad_seq, warmup, max_norm, clip_ratio, beta, eps=1e-6):
    """lishuai-97/AdaGC's AdaGC.clip_by_norm (megatron-gpt2.patch), unsharded, in numpy: returns
    the clipped gradients and gamma after each step. Non-finite norms are left out of gamma
    (gradlab's documented change)."""
    gamma, out = [None] * len(grad_seq[0]), []
    for t, grads in enumerate(grad_seq, 1):
        grads = [np.asarray(g, dtype=np.float64).copy() for g in grads]
        if t <= warmup:
            total = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            coef = max_norm / (total + eps)
            if coef < 1.0:
                grads = [g * coef for g in grads]
            for i, g in enumerate(grads):
                n = float(np.linalg.norm(g))
                if math.isfinite(n) and (gamma[i] is None or n < gamma[i]):
                    gamma[i] = n
        else:
            for i, g in enumerate(grads):
                n = float(np.linalg.norm(g))
                avg = n if gamma[i] is None else gamma[i]
                if n > clip_ratio * avg:
                    grads[i] = g * (clip_ratio * avg / (n + eps))
                    n = clip_ratio * avg
                if math.isfinite(n):
                    gamma[i] = avg * beta + n * (1.0 - beta)
        out.append((grads, list(gamma)))
    return out


def adagc_gradients(steps=14, seed=0):
    """Two tensors whose gradient scale drifts, with a spike in one of them at step 8."""
    g = np.random.default_rng(seed)
    scale = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.42, 0.41, 0.4, 0.39, 0.38, 0.4, 0.37, 0.36][:steps]
    seq = [[g.normal(size=(3,)) * s, g.normal(size=(2, 2)) * s * 2] for s in scale]
    seq[7][1] = seq[7][1] * 50  # a spike in the second tensor only
    return seq


def test_adagc_matches_the_reference():
    seq = adagc_gradients()
    model = Params([(3,), (2, 2)])
    stack = stack_of({"adagc": {"warmup_steps": 3, "max_norm": 1.0, "clip_ratio": 1.04, "beta": 0.9}}, model)
    ref = adagc_reference(seq, 3, 1.0, 1.04, 0.9)
    for t, (grads, (ref_grads, ref_gamma)) in enumerate(zip(seq, ref)):
        for p, g in zip(model.parameters(), grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        gs = stack.process(torch.tensor(0.0))
        for p, r in zip(model.parameters(), ref_grads):
            np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
        np.testing.assert_allclose(stack.stabilizers[0].gamma.numpy(), ref_gamma, rtol=1e-5, err_msg=f"step {t}")
        assert float(gs.current_norm()) == pytest.approx(l2(p.grad for p in model.parameters()), rel=1e-5)
    # the sequence exercises the warm-up's global clip and the per-tensor clip of the spike, not the first tensor
    assert l2(torch.tensor(g) for g in ref[0][0]) == pytest.approx(1.0, rel=1e-5)
    kept = [np.linalg.norm(r) / np.linalg.norm(g) for r, g in zip(ref[7][0], seq[7])]
    assert kept[1] < 0.1 * kept[0]  # per tensor: the spike's tensor is cut far more than the other


def test_adagc_keeps_nonfinite_norms_out_of_gamma():
    model = Params([(2,)])
    stack = stack_of({"adagc": {"warmup_steps": 1, "beta": 0.5}}, model)
    for g in ([0.3, 0.4], [INF, 1.0], [math.nan, 0.0], [0.3, 0.4]):
        model.ps[0].grad = torch.tensor(g)
        stack.process(torch.tensor(0.0))
        assert math.isfinite(float(stack.stabilizers[0].gamma[0]))
    assert float(stack.stabilizers[0].gamma[0]) == pytest.approx(0.5, rel=1e-6)  # 0.5 * 0.5 + 0.5 * 0.5


# ---------------------------------------------------------------- AutoClip / ZClip over known norm sequences
def feed(stack: StabilizerStack, norm: float, loss: float = 1.0):
    """One step whose total gradient norm is ``norm`` (a single 1-element parameter)."""
    stack.params[0].grad = torch.tensor([norm], dtype=torch.float32)
    return stack.process(torch.tensor(loss))


def f32(x: float) -> float:
    return float(np.float32(x))


NORMS = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3, INF, 5.8, 0.7, 9.7, 9.3, 2.3, 8.4, 6.2, 6.4, 3.3, 8.3, 2.7, 9.5]


def autoclip_reference(norms, percentile, window):
    """Seetharaman et al.: threshold = p-th percentile of the norms seen so far, the current one
    included, over the last ``window`` finite norms (non-finite norms are not stored)."""
    hist, out = [], []
    for g in norms:
        if math.isfinite(g):
            hist = (hist + [f32(g)])[-window:]
        out.append(float(np.percentile(hist, percentile)))
    return out


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("window", [4, 7, 1000])  # 4 and 7 wrap within the sequence
def test_autoclip_thresholds_match_reference(percentile, window):
    stack = stack_of({"autoclip": {"percentile": percentile, "window": window}}, Params([(1,)]))
    expected = autoclip_reference(NORMS, percentile, window)
    for g, thr in zip(NORMS, expected):
        gs = feed(stack, g)
        assert float(gs.threshold) == pytest.approx(thr, rel=1e-6), (g, thr)
        if math.isfinite(g):
            assert float(gs.current_norm()) == pytest.approx(f32(g) * min(1.0, thr / (f32(g) + 1e-6)), rel=1e-6)
            assert float(stack.params[0].grad.abs()) == pytest.approx(float(gs.current_norm()), rel=1e-6)


ZNORMS = [1.0, 1.2, 0.8, INF, 1.1,  # warmup (5 finite norms; the inf does not count)
          0.9, 1.05, 5.0, 1.0, 0.95, 8.0, INF, 1.4, 1.1, 3.0, 0.7, 1.2, 12.0, 1.0, 0.85, 1.15, 2.2, 0.9, math.nan, 1.3]


def zclip_reference(norms, warmup=5, alpha=0.9, z_thresh=2.5, eps=1e-6, mode="zscore", clip_option="adaptive_scaling",
                    clip_factor=1.0, skip_update_on_spike=False, max_grad_norm=None):
    """bluorion-com/ZClip's ZClip.step, rewritten in plain Python over a sequence of total norms,
    with gradlab's two documented changes: a non-finite norm neither counts in the warm-up nor
    enters the EMA. Returns per step (threshold, norm after clipping, mean after the step)."""
    buf, mean, var, out = [], None, None, []
    for g in map(f32, norms):
        if mean is None:  # warm-up: collect, clip only at max_grad_norm (torch's clip_grad_norm_)
            if math.isfinite(g):
                buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            cap = INF if max_grad_norm is None else max_grad_norm
            out.append((cap, g * min(1.0, cap / (g + 1e-6)) if math.isfinite(g) else g, mean))
            continue
        std = var ** 0.5
        clip_val, boundary = None, None
        if mode == "percentile":
            boundary = mean + z_thresh * std
            if g > boundary:
                clip_val = boundary
        else:
            z = (g - mean) / (std + eps)
            boundary = mean + z_thresh * (std + eps)  # where z crosses z_thresh (gradlab logs it)
            if z > z_thresh:
                clip_val = (mean + z_thresh * std / (z / z_thresh)) * clip_factor if clip_option == "adaptive_scaling" \
                    else mean
        adaptive = clip_val if clip_val is not None else g
        effective = adaptive if max_grad_norm is None else min(adaptive, max_grad_norm)
        post = g * (effective / (g + 1e-6)) if g > effective else g
        if math.isfinite(g) and not (clip_val is not None and skip_update_on_spike):
            x = clip_val if clip_val is not None else g  # the uncapped value, as the reference
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        threshold = clip_val if clip_val is not None else boundary
        out.append((threshold if max_grad_norm is None else min(threshold, max_grad_norm), post, mean))
    return out


ZCLIP_CASES = {
    "default": {},
    "mean": {"clip_option": "mean"},
    "capped": {"max_grad_norm": 4.0},
    "factor": {"clip_factor": 0.8, "skip_update_on_spike": True},
    "percentile": {"mode": "percentile", "eps": 1e-3},
    "percentile_capped_skip": {"mode": "percentile", "max_grad_norm": 1.1, "skip_update_on_spike": True},
}


@pytest.mark.parametrize("case", list(ZCLIP_CASES))
def test_zclip_matches_the_reference(case):
    knobs = {"warmup_steps": 5, "alpha": 0.9, "z_thresh": 2.5, **ZCLIP_CASES[case]}
    stack = stack_of({"zclip": knobs}, Params([(1,)]))
    zc = stack.stabilizers[0]
    ref = zclip_reference(ZNORMS, **{("warmup" if k == "warmup_steps" else k): v for k, v in knobs.items()})
    clipped = 0
    for step, (g, (thr, post, mean)) in enumerate(zip(ZNORMS, ref)):
        gs = feed(stack, g)
        got = float(gs.threshold)
        assert got == pytest.approx(thr, rel=1e-5, abs=1e-6) or (math.isinf(thr) and math.isinf(got)), (step, g)
        if math.isfinite(g):
            assert float(gs.current_norm()) == pytest.approx(post, rel=1e-5), (step, g)
            clipped += post < f32(g) * (1 - 1e-5)
        if mean is not None:
            assert float(zc.mean) == pytest.approx(mean, rel=1e-5), step
    assert clipped >= 3  # the sequence exercises clipping after the warm-up


def test_zclip_feeds_the_uncapped_norm_into_its_ema():
    """Audit case: warm-up 2, cap 1.0, norms 2, 4, 2.5. The reference's mean after step 3 is
    0.97 * 3 + 0.03 * 2.5 = 2.985 (the raw 2.5, though the step was capped to 1.0); gradlab fed
    the capped 1.0 and got 2.940."""
    stack = stack_of({"zclip": {"warmup_steps": 2, "max_grad_norm": 1.0}}, Params([(1,)]))
    for g in (2.0, 4.0, 2.5):
        gs = feed(stack, g)
    assert float(stack.stabilizers[0].mean) == pytest.approx(2.985, rel=1e-6)
    assert float(gs.current_norm()) == pytest.approx(1.0, rel=1e-5)  # and the step itself was capped


def test_zclip_seeds_only_from_finite_norms():
    """Audit case: a warm-up of non-finite norms (fp16 overflow at the start) left mean 0, var 0,
    and every later gradient was clipped to 0. The warm-up now waits for finite norms."""
    stack = stack_of({"zclip": {"warmup_steps": 3}}, Params([(1,)]))
    zc = stack.stabilizers[0]
    for g in (INF, math.nan, INF, INF):
        feed(stack, g)
    assert int(zc.warmup.count) == 0 and float(zc.mean) == 0.0
    for g in (1.0, 1.5, 2.0):  # the warm-up: untouched
        assert float(feed(stack, g).current_norm()) == pytest.approx(g, rel=1e-6)
    assert float(zc.mean) == pytest.approx(1.5) and float(zc.var) == pytest.approx(1 / 6, rel=1e-5)
    assert float(feed(stack, 1.2).current_norm()) == pytest.approx(1.2, rel=1e-6)  # a normal norm passes


def test_zclip_needs_a_warmup():
    with pytest.raises(ConfigError) as err:
        check(compose(["stabilizer=zclip", "stabilizer.zclip.warmup_steps=0"]))
    assert err.value.key == "stabilizer.zclip.warmup_steps"


# ---------------------------------------------------------------- spike_skip: bit-for-bit untouched
def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
             for p, s in opt.state.items()})


def assert_same(model, opt, snap):
    params, state = snap
    for p, old in zip(model.parameters(), params):
        assert torch.equal(p.detach(), old)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


class SpikeRig:
    """A small model, its optimizer and a spike_skip stack; ``step`` is one training step."""

    def __init__(self, opt_name, window=8, threshold=3.0, min_history=4):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.opt = make_opt(opt_name, self.model.parameters())
        cfg = {"spike_skip": {"window": window, "threshold": threshold, "min_history": min_history}}
        self.stack = stack_of(cfg, self.model)
        self.skipper = self.stack.stabilizers[0]
        self.g = torch.Generator().manual_seed(1)

    def step(self, factor=1.0, poison=None):
        x, y = torch.randn(16, 6, generator=self.g), torch.randint(0, 4, (16,), generator=self.g)
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y) * factor
        loss.backward()
        if poison is not None:
            self.model[0].weight.grad[0, 0] = poison
        gs = self.stack.process(loss.detach())
        self.stack.step(self.opt, gs)
        return bool(gs.skip)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_spike_skip_leaves_params_and_optimizer_state_untouched(opt_name):
    rig = SpikeRig(opt_name)
    assert not any(rig.step() for _ in range(6))  # normal steps, all applied
    assert rig.skipper.losses.count.item() == 6
    for kwargs in ({"factor": 1e3}, {"factor": math.nan}, {"poison": INF}, {"poison": math.nan}, {"factor": INF}):
        snap = snapshot(rig.model, rig.opt)
        assert rig.step(**kwargs), kwargs
        assert_same(rig.model, rig.opt, snap)
        assert rig.skipper.losses.count.item() == 6  # a skipped step does not enter the window
    snap = snapshot(rig.model, rig.opt)
    assert not rig.step()  # and training goes on
    assert not torch.equal(rig.model[0].weight.detach(), snap[0][0])
    if opt_name == "adam":
        assert all(float(s["step"]) == 7 for s in rig.opt.state.values())


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_nonfinite_is_always_skipped(opt_name):
    """Before min_history, and even on the very first step (no optimizer state yet)."""
    rig = SpikeRig(opt_name, min_history=50)
    p0 = [p.detach().clone() for p in rig.model.parameters()]
    assert rig.step(factor=math.nan) and rig.step(poison=INF)
    assert all(torch.equal(p.detach(), q) for p, q in zip(rig.model.parameters(), p0))
    assert not rig.opt.state  # nothing was stepped
    assert not rig.step()
    for kwargs in ({"factor": INF}, {"poison": math.nan}):
        snap = snapshot(rig.model, rig.opt)
        assert rig.step(**kwargs)
        assert_same(rig.model, rig.opt, snap)


def spike_skip_reference(losses, norms, window, k, sided="one", unbiased=True, min_history=None):
    """OLMo-core's SkipStepOptimizer.get_step_factor in numpy: skip when x - mean > k * std (one-sided)
    or |x - mean| > k * std (two-sided) over the last ``window`` values, once there are enough
    (OLMo-core: its list, the current value included, holds window // 2); gradlab keeps skipped
    and non-finite values out of the window. Returns per step (skipped?, norm boundary or None)."""
    need = min_history if min_history is not None else max(2, window // 2 - 1)
    hist_l, hist_n, out = [], [], []

    def test(hist, x):
        if len(hist) < need:
            return False, None
        arr = np.array(hist[-window:], dtype=np.float64)
        mean, std = arr.mean(), arr.std(ddof=1 if unbiased else 0)
        return ((x - mean) if sided == "one" else abs(x - mean)) > k * std, mean + k * std

    for loss, norm in zip(map(f32, losses), map(f32, norms)):
        spike_l, _ = test(hist_l, loss)
        spike_n, boundary = test(hist_n, norm)
        skip = spike_l or spike_n or not (math.isfinite(loss) and math.isfinite(norm))
        out.append((skip, boundary))
        if not skip:
            hist_l.append(loss)
            hist_n.append(norm)
    return out


SKIP_LOSSES = [1.0, 1.1, 0.9, 1.05, 3.0, 0.95, 1.0, 1.2, 0.2, 1.1, 1.0, 5.0, 0.98, 1.02, math.nan, 1.0, 0.97, 0.1]
SKIP_NORMS = [2.0, 2.2, 1.9, 2.1, 2.0, 2.05, 9.0, 2.1, 2.0, 0.3, 2.2, 1.9, INF, 2.0, 2.1, 2.05, 2.0, 2.1]


@pytest.mark.parametrize("knobs", [{}, {"sided": "two", "std": "population", "min_history": 3},
                                   {"sided": "two"}, {"std": "population", "window": 5}])
def test_spike_skip_matches_olmo_core(knobs):
    knobs = {"window": 8, "threshold": 2.0, **knobs}
    stack = stack_of({"spike_skip": knobs}, Params([(1,)]))
    ref = spike_skip_reference(SKIP_LOSSES, SKIP_NORMS, knobs["window"], 2.0, knobs.get("sided", "one"),
                               knobs.get("std", "unbiased") == "unbiased", knobs.get("min_history"))
    for t, (loss, norm, (skip, boundary)) in enumerate(zip(SKIP_LOSSES, SKIP_NORMS, ref)):
        gs = feed(stack, norm, loss)
        assert bool(gs.skip) == skip, (t, loss, norm)
        if boundary is None:
            assert math.isnan(float(gs.threshold)), t
        else:
            assert float(gs.threshold) == pytest.approx(boundary, rel=1e-5), t
    skips = [s for s, _ in ref]
    assert sum(skips) >= 3 and not all(skips[4:])


def test_spike_skip_one_sided_does_not_skip_a_drop():
    """The loss drop at step 8 and the norm drop at step 9 are skipped only two-sided."""
    one = spike_skip_reference(SKIP_LOSSES, SKIP_NORMS, 8, 2.0, "one")
    two = spike_skip_reference(SKIP_LOSSES, SKIP_NORMS, 8, 2.0, "two")
    assert not one[8][0] and not one[9][0] and two[8][0] and two[9][0]


# ---------------------------------------------------------------- SPAM and StableAdamW against the papers' code
def spam_reference(grad_seq, p0, lr, betas, eps, threshold, reset_interval, warmup_steps, clip_delay):
    """SPAM (TianjinYellow/SPAM-Optimizer, galore_torch/SPAM.py) on torch's Adam, in numpy: at step s
    reset m, v when s % interval == 0; clip g^2 > theta v_{t-1} to sign(g) sqrt(theta v) once
    s >= delay and s % interval >= delay; the LR times 1 - CosineDecay(0.99, warmup) for the j-th
    step after a reset; Adam's step count is not reset. Returns the parameters after each step."""
    (b1, b2), p = betas, np.asarray(p0, dtype=np.float64).copy()
    m, v, out, clipped = np.zeros_like(p), np.zeros_like(p), [], 0
    for s, g in enumerate(grad_seq, 1):
        g = np.asarray(g, dtype=np.float64).copy()
        if s % reset_interval == 0:
            m[:], v[:] = 0.0, 0.0
        elif s >= clip_delay and s % reset_interval >= clip_delay:
            mask = g * g > threshold * v
            g[mask] = np.sign(g[mask]) * np.sqrt(threshold * v[mask])
            clipped += int(mask.sum())
        j = s % reset_interval
        scale = 1 - 0.99 * (1 + math.cos(math.pi * j / (warmup_steps + 1))) / 2 \
            if s >= reset_interval and j < warmup_steps else 1.0
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * scale / (1 - b1 ** s) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** s) + eps)
        out.append(p.copy())
    return out, clipped


def spam_gradients(steps=30, seed=3):
    g = np.random.default_rng(seed)
    seq = [g.normal(size=(4, 3)) for _ in range(steps)]
    for t, (i, j) in {5: (0, 0), 9: (2, 1), 17: (1, 2), 27: (3, 0)}.items():
        seq[t][i, j] *= 1e3  # single-element spikes, some inside a post-reset delay
    seq[20][0, 1] = INF
    return seq


def test_spam_matches_the_reference():
    from gradlab.optim import Schedule

    knobs = {"threshold": 50.0, "reset_interval": 12, "warmup_steps": 4, "clip_delay": 3}
    model = Params([(4, 3)], seed=1)
    p0 = model.ps[0].detach().numpy().copy()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-8)
    stack = stack_of({"spam": knobs}, model)
    stack.bind(opt)
    schedule = Schedule(opt, compose(["scheduler=none"]).scheduler, None, 30, 30, stack.lr_factors())
    seq = spam_gradients()
    ref, clipped = spam_reference(seq, p0, 0.01, (0.9, 0.999), 1e-8, **knobs)
    lrs = []
    for t, g in enumerate(seq):
        model.ps[0].grad = torch.tensor(g, dtype=torch.float32)
        lrs.append(schedule.lr)
        stack.step(opt, stack.process(torch.tensor(0.0)))
        schedule.step()
        np.testing.assert_allclose(model.ps[0].detach().numpy(), ref[t], rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
    assert clipped >= 4 and np.isfinite(ref[-1]).all()  # it clipped, the inf element too
    assert lrs[10] == 0.01 and lrs[11] == pytest.approx(0.01 * 0.01) and lrs[15] == pytest.approx(0.01)  # warm-up


def test_spam_needs_an_adam_type_optimizer():
    for overrides in (["stabilizer=spam", "optimizer=sgd"], ["stabilizer=spam", "optimizer=rmsprop"]):
        with pytest.raises(ConfigError) as err:
            check(compose(overrides))
        assert err.value.key == "stabilizer.spam"
    for name in ("adam", "adamw", "stable_adamw"):
        check(compose(["stabilizer=spam", f"optimizer={name}"]))
    with pytest.raises(ConfigError) as err:
        check(compose(["stabilizer=spam", "scheduler=onecycle"]))
    assert err.value.key == "stabilizer.spam.reset_interval"
    check(compose(["stabilizer=spam", "scheduler=onecycle", "stabilizer.spam.reset_interval=null"]))


def stable_adamw_reference(grad_seq, p0, lr, betas, eps, weight_decay, d):
    """The authors' StableAdamWUnfused (Wortsman's gist) in numpy: bias-corrected betas,
    RMS = sqrt(mean(g^2 / max(u, eps^2))), p <- p (1 - lr wd) - lr / max(1, RMS / d) v / (sqrt(u) + eps).
    Returns the parameters after each step and the RMS values."""
    (b1, b2), p = betas, np.asarray(p0, dtype=np.float64).copy()
    v, u, out, rmss = np.zeros_like(p), np.zeros_like(p), [], []
    for step, g in enumerate(grad_seq, 1):
        g = np.asarray(g, dtype=np.float64)
        b1hat = b1 * (1 - b1 ** (step - 1)) / (1 - b1 ** step)
        b2hat = b2 * (1 - b2 ** (step - 1)) / (1 - b2 ** step)
        v = b1hat * v + (1 - b1hat) * g
        u = b2hat * u + (1 - b2hat) * g * g
        rms = math.sqrt(float(np.mean(g * g / np.maximum(u, eps ** 2))))
        p = p * (1 - lr * weight_decay) - lr / max(1.0, rms / d) * v / (np.sqrt(u) + eps)
        out.append(p.copy())
        rmss.append(rms)
    return out, rmss


def run_optimizer(opt, model, seq):
    out = []
    for g in seq:
        model.ps[0].grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        out.append(model.ps[0].detach().numpy().copy())
    return out


def test_stable_adamw_matches_the_reference():
    from gradlab.optim import StableAdamW

    seq = spam_gradients()[:20]
    seq[20 - 1] = seq[20 - 1] * 30  # a spike late: its RMS far above 1
    model = Params([(4, 3)], seed=2)
    ref, rms = stable_adamw_reference(seq, model.ps[0].detach().numpy(), 0.01, (0.9, 0.99), 1e-6, 0.1, 1.0)
    got = run_optimizer(StableAdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1), model, seq)
    for t, (a, b) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    assert sum(r > 1.0 for r in rms) >= 3  # update clipping fired


def test_stable_adamw_is_adamw_when_nothing_is_clipped():
    from gradlab.optim import StableAdamW

    seq = spam_gradients()[:20]
    a, b = Params([(4, 3)], seed=2), Params([(4, 3)], seed=2)
    got = run_optimizer(StableAdamW(a.parameters(), lr=0.01, weight_decay=0.05, clip_thresh=1e9), a, seq)
    ref = run_optimizer(torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.05), b, seq)
    for t, (x, y) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")


# ================================================================ B. no host sync in Trainer.step
SYNC_CALLS = ["item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"]


@contextlib.contextmanager
def forbid_host_sync(allowed=()):
    """Every Tensor -> host read raises (and is recorded, in case something swallows it).
    ``allowed``: host-resident tensors read by design (Adam's non-capturable ``step`` counter,
    which torch keeps on the CPU even when training on CUDA)."""
    keep, calls = {id(t) for t in allowed}, []
    with pytest.MonkeyPatch.context() as mp:
        for name in SYNC_CALLS:
            orig = getattr(torch.Tensor, name)

            def guard(self, *args, _name=name, _orig=orig, **kwargs):
                if id(self) in keep:
                    return _orig(self, *args, **kwargs)
                calls.append(_name)
                raise AssertionError(f"host sync inside Trainer.step: Tensor.{_name}()")

            mp.setattr(torch.Tensor, name, guard)
        yield calls
    assert not calls, calls


ALL = [name for name in STABILIZERS.names() if name != "none"]  # in the run order
SMALL = {"warmup": ["stabilizer.warmup.steps=3"], "autoclip": ["stabilizer.autoclip.window=3"],
         "zclip": ["stabilizer.zclip.warmup_steps=3"], "adagc": ["stabilizer.adagc.warmup_steps=3"],
         "spam": ["stabilizer.spam.reset_interval=4", "stabilizer.spam.warmup_steps=2", "stabilizer.spam.clip_delay=2"],
         "spike_skip": ["stabilizer.spike_skip.window=4", "stabilizer.spike_skip.min_history=2"]}
NEEDS_ADAM = {"spam"}
# every stabilizer with sgd (where it applies) and adam; everything at once with each optimizer
SYNC_CASES = [(s, o) for s in ALL if s != "warmup" for o in ("sgd", "adam") if not (s in NEEDS_ADAM and o == "sgd")] + \
    [("spam", "stable_adamw")] + [("all", o) for o in ("sgd", "adam", "stable_adamw")]


def sync_trainer(tmp_path, stabilizer, optimizer, device="cpu"):
    names = [n for n in ALL if optimizer != "sgd" or n not in NEEDS_ADAM] if stabilizer == "all" else [stabilizer]
    over = [f"stabilizer=[{','.join(names)}]", *[o for n in names for o in SMALL.get(n, [])],
            f"optimizer={optimizer}", "telemetry.log_every=50", "telemetry.layer_every=2", f"trainer.device={device}"]
    trainer = Trainer(tiny_cfg(tmp_path, *over), tmp_path / "out")
    perm = torch.randperm(len(trainer.train_data), generator=torch.Generator().manual_seed(0))
    batches = list(trainer.train_data.shuffled_batches(trainer.cfg.trainer.batch_size, perm))[:9]
    for x, y in batches[:2]:  # warm-up: optimizer state exists, spike_skip's one host read is past
        trainer.engine.step(x, y)
    trainer.engine.recorder.flush()
    return trainer.engine, batches[2:]


@pytest.mark.parametrize("stabilizer,optimizer", SYNC_CASES)
def test_no_host_sync_in_step(tmp_path, stabilizer, optimizer):
    engine, batches = sync_trainer(tmp_path, stabilizer, optimizer)
    counters = [s["step"] for s in engine.optimizer.state.values() if torch.is_tensor(s.get("step"))]
    with forbid_host_sync(counters):
        for x, y in batches:  # crosses zclip's warmup, autoclip's window wrap and layer steps
            engine.step(x, y)
    assert engine.stack.skips == (stabilizer in ("spike_skip", "all"))
    h = engine.recorder.history
    engine.recorder.flush()
    assert h.steps == list(range(9)) and np.isfinite(h.column("grad/norm")).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stabilizer,optimizer", SYNC_CASES)
def test_no_host_sync_in_step_cuda(tmp_path, stabilizer, optimizer):
    engine, batches = sync_trainer(tmp_path, stabilizer, optimizer, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            engine.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.recorder.flush()
    assert np.isfinite(engine.recorder.history.column("grad/norm")).all()


# ================================================================ C. mixed precision: unscale first
def scaler_pair(tmp_path):
    over = ["stabilizer=[clip]", "stabilizer.clip.max_norm=0.05", "optimizer=sgd"]
    a = Trainer(tiny_cfg(tmp_path / "a", *over), tmp_path / "a" / "out")
    b = Trainer(tiny_cfg(tmp_path / "b", *over), tmp_path / "b" / "out")
    b.engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for p, q in zip(a.engine.model.parameters(), b.engine.model.parameters()):
        assert torch.equal(p, q)
    return a.engine, b.engine, a.train_data


def capture_grads(engine):
    """Record the gradients the stabilizers receive."""
    seen, process = [], engine.stack.process

    def spy(loss):
        seen.append([p.grad.detach().clone() for p in engine.stack.params])
        return process(loss)

    engine.stack.process = spy
    return seen


def test_grad_scaler_gradients_are_unscaled_before_stabilizers(tmp_path):
    a, b, data = scaler_pair(tmp_path)
    seen_a, seen_b = capture_grads(a), capture_grads(b)
    batches = list(data.batches(32))[:3]
    for x, y in batches:
        a.step(x, y)
        b.step(x, y)
    for ga, gb in zip(seen_a, seen_b):
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-9)  # not 65536x
    ha, hb = a.recorder.history, b.recorder.history
    a.recorder.flush()
    b.recorder.flush()
    for key in ("grad/norm", "grad/norm_after", "grad/clip_coef", "grad/skipped"):
        np.testing.assert_allclose(hb.column(key), ha.column(key), rtol=1e-6, err_msg=key)
    assert (ha.column("grad/norm") > 0.05).all()  # the clip fired ...
    np.testing.assert_allclose(hb.column("grad/norm_after"), 0.05, rtol=1e-5)  # ... at the unscaled norm
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert b.scaler.get_scale() == 2.0 ** 16


def test_grad_scaler_skipped_step_is_recorded_as_skipped(tmp_path):
    _, b, data = scaler_pair(tmp_path)
    x, y = next(data.batches(32))
    b.step(x, y)  # momentum state exists
    params, state = snapshot(b.model, b.optimizer)
    hook = b.model.head.bias.register_hook(lambda g: torch.full_like(g, INF))
    b.step(x, y)
    hook.remove()
    assert_same(b.model, b.optimizer, (params, state))
    assert b.scaler.get_scale() == 2.0 ** 15  # the scaler saw the inf and backed off
    b.step(x, y)
    h = b.recorder.history
    b.recorder.flush()
    assert list(h.column("grad/skipped")) == [0.0, 1.0, 0.0]
    assert math.isinf(h.column("grad/norm")[1])
    assert DivergenceWatch(100).update(h.steps, np.concatenate(h.rows)) is None  # a skipped inf is not a divergence


def test_grad_scaler_with_spike_skip(tmp_path):
    """Both skip an inf step: on the first step (spike_skip's host path returns before
    scaler.step; scaler.update still works) and later (device path around scaler.step)."""
    trainer = Trainer(tiny_cfg(tmp_path, "stabilizer=[spike_skip]", "stabilizer.spike_skip.min_history=2"), tmp_path / "out")
    t = trainer.engine
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = next(trainer.train_data.batches(32))

    def poisoned_step():
        hook = t.model.head.bias.register_hook(lambda g: torch.full_like(g, INF))
        t.step(x, y)
        hook.remove()

    snap = snapshot(t.model, t.optimizer)
    poisoned_step()
    assert_same(t.model, t.optimizer, snap)
    assert not t.optimizer.state
    for _ in range(3):
        t.step(x, y)
    snap = snapshot(t.model, t.optimizer)
    poisoned_step()
    assert_same(t.model, t.optimizer, snap)
    assert t.scaler.get_scale() == 2.0 ** 14
    h = t.recorder.history
    t.recorder.flush()
    assert list(h.column("grad/skipped")) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_bf16_on_cpu_end_to_end(tmp_path):
    cfg = tiny_cfg(tmp_path, "trainer.precision=bf16", "stabilizer=[clip,zclip]",
                   "stabilizer.zclip.warmup_steps=2", steps=6)
    r = train(cfg, tmp_path / "out")
    assert not r.diverged and r.steps == 6 and 0.0 <= r.val_accuracy <= 1.0
    state = checkpoint.load(r.checkpoint, torch.device("cpu"), "checkpoint")
    assert all(v.dtype == torch.float32 for v in state["engine"]["model"].values() if v.is_floating_point())


# ================================================================ D. state round trips
STATEFUL = {
    "clip": {"max_norm": 1.0, "norm_type": 2.0},
    "clip_value": {"clip_value": 0.5},
    "agc": {"clipping": 0.01, "eps": 1e-3, "exclude": ["auto"]},
    "adagc": {"warmup_steps": 4, "clip_ratio": 1.04, "beta": 0.9},
    "autoclip": {"percentile": 30.0, "window": 4},
    "zclip": {"warmup_steps": 4, "alpha": 0.9, "z_thresh": 2.0, "mode": "zscore", "max_grad_norm": None},
    "spam": {"threshold": 5.0, "reset_interval": 7, "warmup_steps": 3, "clip_delay": 2},
    "spike_skip": {"window": 5, "threshold": 2.0, "min_history": 3},
}
WITH_STATE = ("adagc", "autoclip", "zclip", "spam", "spike_skip")
LOSSES = [1.0, 1.1, 0.9, 1.05, 3.0, 0.95, 1.0, 1.2, 0.2, 1.1, 1.0, 5.0, 0.98, 1.02, 0.97, 1.3, 1.0, 0.99, 1.1, 1.0]


class Rig:
    """One 1-element parameter, Adam and a stack (bound to Adam, for spam): ``trace`` is one step."""

    def __init__(self, name):
        self.model = Params([(1,)])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.stack = stack_of({name: STATEFUL[name]}, self.model)
        self.stack.bind(self.opt)

    def trace(self, g, loss):
        gs = feed(self.stack, g, loss)
        self.stack.step(self.opt, gs)
        return [None if v is None else v.clone() for v in (gs.threshold, gs.skip)] + \
            [gs.current_norm().clone(), self.model.ps[0].detach().clone()]

    def state_dict(self):
        return {"stack": self.stack.state_dict(), "opt": self.opt.state_dict(), "model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.stack.load_state_dict(state["stack"])
        self.opt.load_state_dict(state["opt"])
        self.model.load_state_dict(state["model"])


def same(u, v) -> bool:
    return (u is None and v is None) or (u is not None and v is not None and torch.equal(u.isnan(), v.isnan())
                                         and torch.equal(u.nan_to_num(), v.nan_to_num()))


@pytest.mark.parametrize("name", list(STATEFUL))
@pytest.mark.parametrize("split", [3, 9])  # inside and after the warmups / windows
def test_state_round_trip(name, split):
    a = Rig(name)
    for g, loss in zip(NORMS[:split], LOSSES):
        a.trace(g, loss)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a checkpoint, as Trainer.save does
    buf.seek(0)
    b = Rig(name)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for g, loss in zip(NORMS[split:], LOSSES[split:]):
        assert all(same(u, v) for u, v in zip(a.trace(g, loss), b.trace(g, loss)))
    # and a stack without its state (the optimizer's restored) decides differently where it has state
    if name in WITH_STATE:
        a2, c = Rig(name), Rig(name)
        for g, loss in zip(NORMS[:split], LOSSES):
            a2.trace(g, loss)
        c.load_state_dict({**a2.state_dict(), "stack": c.stack.state_dict()})
        differs = False
        for g, loss in zip(NORMS[split:], LOSSES[split:]):
            differs |= not all(same(u, v) for u, v in zip(a2.trace(g, loss), c.trace(g, loss)))
        assert differs


def test_state_dict_is_a_snapshot():
    names = ("adagc", "autoclip", "zclip", "spike_skip")
    stack = stack_of({n: STATEFUL[n] for n in names}, Params([(1,)]))
    for g, loss in zip(NORMS[:6], LOSSES):
        feed(stack, g, loss)
    saved = copy.deepcopy(stack.state_dict())
    state = stack.state_dict()
    for g, loss in zip(NORMS[6:12], LOSSES[6:]):
        feed(stack, g, loss)
    torch.testing.assert_close(state, saved, equal_nan=True)  # later steps did not write into it
    assert set(saved) == {"stepped", *names}


# ================================================================ E. the audit's definitions, end to end
def poisoned_trainer(tmp_path, *overrides, at=4, scale=1e4, inf=False, steps=8):
    """A tiny Trainer whose head.bias gradient is multiplied by ``scale`` (or has one element set
    to inf) on step ``at``."""
    trainer = Trainer(tiny_cfg(tmp_path, *overrides, steps=steps), tmp_path / "out")
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        if calls["n"] - 1 != at:
            return g
        if inf:
            g = g.clone()
            g[0] = INF
            return g
        return g * scale

    trainer.engine.model.head.bias.register_hook(hook)
    return trainer


@pytest.mark.parametrize("stabilizers", [["spike_skip"], ["clip", "spike_skip"]])
def test_clip_coef_is_what_the_clippers_did_not_the_skip(tmp_path, stabilizers):
    """Audit case: a skipped step logged clip_coef 1.0 with spike_skip alone but 0 with another
    stabilizer, so clip(max_norm=1e9), which clips nothing, showed clip_rate 1/n. clip_coef is the
    clippers' norm ratio; skipping is grad/skipped."""
    trainer = poisoned_trainer(tmp_path, f"stabilizer=[{','.join(stabilizers)}]", "stabilizer.spike_skip.window=4",
                              "stabilizer.spike_skip.min_history=3", *(["stabilizer.clip.max_norm=1e9"]
                                                                         if "clip" in stabilizers else []))
    r = trainer.fit()
    h = trainer.history
    assert list(h.column("grad/skipped")) == [0, 0, 0, 0, 1, 0, 0, 0]
    assert list(h.column("grad/clip_coef")) == [1.0] * 8
    assert client(r.tracking_uri).get_run(r.run_id).data.metrics["clip_rate"] == 0.0
    assert h.column("grad/norm_after")[4] == 0.0  # the skipped step applied nothing


def test_clip_value_bounds_an_inf_gradient_and_the_run_goes_on(tmp_path):
    """Decision: clip_value turns an inf element into +-c, a finite update reaches the weights,
    so the run is not diverged (it was, before); a norm clipper turns the same step into NaN."""
    value = poisoned_trainer(tmp_path / "v", "stabilizer=[clip_value]", inf=True)
    r = value.fit()
    h = value.history
    assert not r.diverged and r.steps == 8
    assert math.isinf(h.column("grad/norm")[4]) and np.isfinite(h.column("grad/norm_after")).all()
    assert all(torch.isfinite(p).all() for p in value.engine.model.parameters())
    norm = poisoned_trainer(tmp_path / "n", "stabilizer=[clip]", inf=True)
    r = norm.fit()
    assert r.diverged and r.diverged_at_step == 4
