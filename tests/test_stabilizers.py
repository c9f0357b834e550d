"""Gradient stabilizers: exact against torch and the paper formulas, no host sync on the
step path, fp16's unscale before any stabilizer, and state that survives a checkpoint.

References are written here from ../shared/reference/stabilizers.md in plain Python/numpy,
never by calling the implementation."""
from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose, tiny_cfg
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
    return StabilizerStack(cfg, model, CPU)


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


ZNORMS = [1.0, 1.2, 0.8, INF, 1.1,  # warmup (5 steps; the inf is not stored)
          0.9, 1.05, 5.0, 1.0, 0.95, 8.0, INF, 1.4, 1.1, 3.0, 0.7, 1.2, 12.0, 1.0, 0.85, 1.15, 2.2, 0.9]


def zclip_reference(norms, warmup, alpha, z_thresh, mode, cap, ema_of_clipped=True):
    """Kumar et al.: warmup collects norms (clip only at the cap), then population mean/variance
    seed the EMA; z = (g - mu) / (sigma + 1e-6); above z_thresh clip to mu + z^2_thresh sigma / z
    (zscore) or mu (mean), capped; EMA with the clipped value x: mu <- a mu + (1-a) x, then
    var <- a var + (1-a)(x - mu)^2. Returns per step (threshold, clipped?, z)."""
    eps, buf, mean, var, out = 1e-6, [], 0.0, 0.0, []
    for t, g in enumerate(map(f32, norms)):
        if t < warmup:
            if math.isfinite(g):
                buf.append(g)
            if t == warmup - 1:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append((cap, g > cap, None))
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        if z > z_thresh:
            thr = min(mean + z_thresh ** 2 * std / z if mode == "zscore" else mean, cap)
        else:
            thr = min(mean + z_thresh * std, cap)  # the paper's boundary: no clip below it
        clipped = z > z_thresh or g > cap
        if math.isfinite(g):
            x = min(g, thr) if ema_of_clipped else g
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append((thr, clipped, z))
    return out


@pytest.mark.parametrize("mode", ["zscore", "mean"])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_zclip_thresholds_match_reference(mode, cap):
    cfg = {"warmup_steps": 5, "alpha": 0.9, "z_thresh": 2.5, "mode": mode, "max_grad_norm": cap}
    stack = stack_of({"zclip": cfg}, Params([(1,)]))
    ref = zclip_reference(ZNORMS, 5, 0.9, 2.5, mode, INF if cap is None else cap)
    assert sum(c for _, c, _ in ref[5:]) >= 4  # the sequence exercises clipping after warmup
    for step, (g, (thr, clipped, z)) in enumerate(zip(ZNORMS, ref)):
        assert z is None or not math.isfinite(z) or abs(z - 2.5) > 0.05  # no near-ties to flip a branch
        gs = feed(stack, g)
        got = float(gs.threshold)
        assert got == pytest.approx(thr, rel=1e-5, abs=1e-5), (step, g)
        if math.isfinite(g):
            post = float(gs.current_norm())
            if clipped:
                assert post == pytest.approx(thr, rel=1e-5), (step, g)
            else:
                assert post == pytest.approx(f32(g), rel=1e-5), (step, g)  # untouched (within torch's eps)
    # the EMA really is fed the clipped value: an unclipped EMA gives other thresholds
    raw = zclip_reference(ZNORMS, 5, 0.9, 2.5, mode, INF if cap is None else cap, ema_of_clipped=False)
    assert not np.allclose([t for t, _, _ in raw[5:]], [t for t, _, _ in ref[5:]], rtol=1e-3)


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


def test_spike_skip_z_score_reference():
    """Skip iff |x - mean| / std over the accepted window exceeds the threshold for the loss or
    the grad norm (population std), once min_history values are stored."""
    stack = stack_of({"spike_skip": {"window": 5, "threshold": 2.0, "min_history": 3}}, Params([(1,)]))
    losses = [1.0, 1.1, 0.9, 1.05, 3.0, 0.95, 1.0, 1.2, 0.2, 1.1, 1.0, 5.0, 0.98]
    hist = []
    for loss in losses:
        gs = feed(stack, 1.0, loss)  # constant grad norm: never a spike on its own
        arr = np.array(hist[-5:], dtype=np.float64)
        expected = len(arr) >= 3 and abs(f32(loss) - arr.mean()) / arr.std() > 2.0
        assert bool(gs.skip) == expected, (loss, hist)
        if not expected:
            hist.append(f32(loss))


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
         "zclip": ["stabilizer.zclip.warmup_steps=3"],
         "spike_skip": ["stabilizer.spike_skip.window=4", "stabilizer.spike_skip.min_history=2"]}


def sync_trainer(tmp_path, stabilizer, optimizer, device="cpu"):
    names = ALL if stabilizer == "all" else [stabilizer]
    over = [f"stabilizer=[{','.join(names)}]", *[o for n in names for o in SMALL.get(n, [])],
            f"optimizer={optimizer}", "telemetry.log_every=50", "telemetry.layer_every=2", f"trainer.device={device}"]
    trainer = Trainer(tiny_cfg(tmp_path, *over), tmp_path / "out")
    perm = torch.randperm(len(trainer.train_data), generator=torch.Generator().manual_seed(0))
    batches = list(trainer.train_data.shuffled_batches(trainer.cfg.trainer.batch_size, perm))[:9]
    for x, y in batches[:2]:  # warm-up: optimizer state exists, spike_skip's one host read is past
        trainer.engine.step(x, y)
    trainer.engine.recorder.flush()
    return trainer.engine, batches[2:]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("stabilizer", [s for s in ALL if s != "warmup"] + ["all"])
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
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("stabilizer", [s for s in ALL if s != "warmup"] + ["all"])
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
    "autoclip": {"percentile": 30.0, "window": 4},
    "zclip": {"warmup_steps": 4, "alpha": 0.9, "z_thresh": 2.0, "mode": "zscore", "max_grad_norm": None},
    "spike_skip": {"window": 5, "threshold": 2.0, "min_history": 3},
}
LOSSES = [1.0, 1.1, 0.9, 1.05, 3.0, 0.95, 1.0, 1.2, 0.2, 1.1, 1.0, 5.0, 0.98, 1.02, 0.97, 1.3, 1.0, 0.99, 1.1, 1.0]


@pytest.mark.parametrize("name", list(STATEFUL))
@pytest.mark.parametrize("split", [3, 9])  # inside and after the warmups / windows
def test_state_round_trip(name, split):
    def trace(stack, g, loss):
        gs = feed(stack, g, loss)
        return [None if v is None else v.clone() for v in (gs.threshold, gs.skip)] + [gs.current_norm().clone()]

    a = stack_of({name: STATEFUL[name]}, Params([(1,)]))
    for g, loss in zip(NORMS[:split], LOSSES):
        trace(a, g, loss)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a checkpoint, as Trainer.save does
    buf.seek(0)
    b = stack_of({name: STATEFUL[name]}, Params([(1,)]))
    b.load_state_dict(torch.load(buf, weights_only=True))
    for g, loss in zip(NORMS[split:], LOSSES[split:]):
        ta, tb = trace(a, g, loss), trace(b, g, loss)
        for u, v in zip(ta, tb):
            assert (u is None and v is None) or torch.equal(u, v) or (u.isnan().all() and v.isnan().all())
    # and a fresh stack (no state) decides differently where the stabilizer has state
    if name in ("autoclip", "zclip", "spike_skip"):
        c = stack_of({name: STATEFUL[name]}, Params([(1,)]))
        a2 = stack_of({name: STATEFUL[name]}, Params([(1,)]))
        for g, loss in zip(NORMS[:split], LOSSES):
            trace(a2, g, loss)
        differs = False
        for g, loss in zip(NORMS[split:], LOSSES[split:]):
            ta, tc = trace(a2, g, loss), trace(c, g, loss)
            differs |= any(not (u is None and v is None) and not torch.equal(u, v) for u, v in zip(ta, tc))
        assert differs


def test_state_dict_is_a_snapshot():
    stack = stack_of({"autoclip": STATEFUL["autoclip"], "zclip": STATEFUL["zclip"],
                      "spike_skip": STATEFUL["spike_skip"]}, Params([(1,)]))
    for g, loss in zip(NORMS[:6], LOSSES):
        feed(stack, g, loss)
    saved = copy.deepcopy(stack.state_dict())
    state = stack.state_dict()
    for g, loss in zip(NORMS[6:12], LOSSES[6:]):
        feed(stack, g, loss)
    torch.testing.assert_close(state, saved, equal_nan=True)  # later steps did not write into it
    assert set(saved) == {"stepped", "autoclip", "zclip", "spike_skip"}
