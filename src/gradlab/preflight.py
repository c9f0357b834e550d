"""Preflight: will this run diverge? Measured before the first update, on the run's first batches.

Three measurements, each with the run's real model, init, optimizer, learning rate and data:

* signal propagation: each parameterised layer's output scale (forward) and the scale of the
  loss gradient at that output (backward), so the layer-to-layer gain says where a gradient
  grows and by how much per layer;
* sharpness: the top Hessian eigenvalue against the optimizer's stability limit
  (``gradlab.sharpness``), the largest over the batches;
* for recurrent models, the largest singular value of the Jacobian of the last hidden state
  with respect to the first, d h_T / d h_0, over the sequence: how much a gradient grows
  travelling back through T steps.

Each becomes a risk with a verdict (OK / at risk / will diverge), the number behind it and
what to try. A stabilizer that bounds every update's size from the first step (``clip``,
``agc``, ``zclip`` with ``max_grad_norm``) turns an instability into a bounded oscillation:
the risk is kept in the table with its number, and judged OK, "bounded by <name>".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jvp, vjp
from torch.func import functional_call

from . import sharpness

OK, AT_RISK, WILL_DIVERGE = "OK", "at risk", "will diverge"
LEVELS = (OK, AT_RISK, WILL_DIVERGE)
BATCHES = 3  # preflight batches: the run's first ones
GROWTH_AT_RISK = 10.0  # a scale that grows 10x across the layers / the sequence
RATIO_AT_RISK = 0.5  # sharpness at half the limit: measured, SGD at r~0.8 still diverged (README)


# ---------------------------------------------------------------- measurements
@dataclass
class LayerScale:
    name: str
    act_rms: float  # RMS of the layer's output
    grad_rms: float  # RMS of the loss gradient at that output


def parameterised_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules that hold parameters themselves (Linear, Conv, RNN, norms): the layers whose
    outputs are measured, in definition order."""
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def layer_scales(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> List[LayerScale]:
    """Output and output-gradient RMS of every parameterised layer, in execution order. Leaves the
    model's parameters, gradients, buffers and the RNG as they were."""
    outputs: Dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in parameterised_modules(model).items()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else [],
                                   device_type=x.device.type):
            logits = functional_call(model, buffers, (x,), strict=False)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            grads = torch.autograd.grad(loss, list(outputs.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    rms = lambda t: float(t.detach().float().pow(2).mean().sqrt()) if t is not None else math.nan  # noqa: E731
    return [LayerScale(n, rms(o), rms(g)) for (n, o), g in zip(outputs.items(), grads)]


def recurrent_growth(model: nn.Module, x: torch.Tensor, samples: int = 16, iters: int = 10,
                     generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """max over ``samples`` sequences of the largest singular value of d h_T / d h_0 (device scalar),
    by power iteration on J^T J per sample (products through torch.autograd.functional); None for a
    model without a recurrent layer (``model.rnn``)."""
    rnn = getattr(model, "rnn", None)
    if not isinstance(rnn, (nn.RNN, nn.LSTM)):
        return None
    seq = model.as_sequence(x[:samples]).detach()
    shape = (1, seq.shape[0], rnn.hidden_size)
    h0 = torch.zeros(shape, device=x.device)
    c0 = torch.zeros(shape, device=x.device)

    def last_hidden(h):
        _, state = rnn(seq, (h, c0) if isinstance(rnn, nn.LSTM) else h)
        return state[0] if isinstance(rnn, nn.LSTM) else state

    def unit(u):
        return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp(min=1e-30)

    u = unit(torch.randn(shape, generator=generator).to(x.device))
    for _ in range(iters):
        ju = jvp(last_hidden, h0, u)[1]
        u = unit(vjp(last_hidden, h0, ju)[1])
    return torch.linalg.vector_norm(jvp(last_hidden, h0, u)[1], dim=-1).max().detach()


# ---------------------------------------------------------------- risks and verdicts
@dataclass
class Risk:
    name: str
    value: str  # the number behind the verdict, in words
    verdict: str
    remedy: str  # what to try: gradlab options
    bounded_by: Optional[str] = None  # a stabilizer that bounds every update (verdict then OK)


def bounded_by(stack) -> Optional[str]:
    """The first selected stabilizer that bounds the size of every update from the first step."""
    return next((s.name for s in stack.stabilizers if s.bounds_update), None)


def judge(name: str, value: str, verdict: str, remedy: str, bound: Optional[str]) -> Risk:
    if verdict != OK and bound is not None:
        return Risk(name, value, OK, f"(bounded by {bound}; raw verdict: {verdict})", bound)
    return Risk(name, value, verdict, remedy if verdict != OK else "")


def growth(values: Sequence[float]) -> tuple[float, int, int]:
    """The largest growth along ``values``: max of values[j] / values[i] over i < j (finite,
    positive values), with i and j; (1.0, 0, 0) when nothing grows."""
    best, lo = (1.0, 0, 0), None
    for j, v in enumerate(values):
        if not (math.isfinite(v) and v > 0):
            continue
        if lo is not None and v / values[lo] > best[0]:
            best = (v / values[lo], lo, j)
        if lo is None or v < values[lo]:
            lo = j
    return best


def _columns(rows: List[tuple]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


@dataclass
class Report:
    layers: List[LayerScale]
    lambda_max: float
    limit: float
    lr: float
    recurrent: Optional[float]
    risks: List[Risk] = field(default_factory=list)
    run_id: Optional[str] = None  # the MLflow run it was logged to

    @property
    def ratio(self) -> float:
        return self.lambda_max / self.limit

    @property
    def verdict(self) -> str:
        return max((r.verdict for r in self.risks), key=LEVELS.index, default=OK)

    def metrics(self) -> Dict[str, float]:
        out = {"preflight/lambda_max": self.lambda_max, "preflight/stability_limit": self.limit,
               "preflight/stability_ratio": self.ratio,
               "preflight/verdict_level": float(LEVELS.index(self.verdict))}
        if self.recurrent is not None:
            out["preflight/recurrent_growth"] = self.recurrent
        out["preflight/activation_growth"] = growth([s.act_rms for s in self.layers])[0]
        out["preflight/gradient_growth"] = growth([s.grad_rms for s in reversed(self.layers)])[0]
        for s in self.layers:
            out[f"preflight/act_rms/{s.name}"] = s.act_rms
            out[f"preflight/grad_rms/{s.name}"] = s.grad_rms
        return out

    def tags(self) -> Dict[str, str]:
        return {"preflight/verdict": self.verdict,
                **{f"preflight/{r.name.replace(' ', '_')}": r.verdict for r in self.risks}}

    def table(self) -> str:
        """The per-layer scales, then one row per risk, then the overall verdict line."""
        rows = [("layer", "output RMS", "gain", "output-gradient RMS", "gain (backward)")]
        for i, s in enumerate(self.layers):
            prev = self.layers[i - 1] if i else None
            rows.append((s.name, f"{s.act_rms:.3g}", f"x{s.act_rms / prev.act_rms:.3g}" if prev else "",
                         f"{s.grad_rms:.3g}", f"x{prev.grad_rms / s.grad_rms:.3g}" if prev and s.grad_rms else ""))
        risks = [("risk", "value", "verdict", "what to try")] + [(r.name, r.value, r.verdict, r.remedy) for r in self.risks]
        return "\n".join(_columns(rows) + [""] + _columns(risks) + [f"verdict: {self.verdict}"])


def sharpness_risk(cfg, lam: float, limit: float, lr: float, bound: Optional[str]) -> Risk:
    """SGD: the limit is hard (r >= 1 diverges on the quadratic model), r >= 0.5 is at risk
    (sharpness grows early in training). Adam-type: the preconditioner grows when the iterate
    oscillates, which pulls r back under 1 (Cohen et al. 2022), so r >= 1 is at risk only."""
    r = lam / limit
    what = "preconditioned " if sharpness.preconditioned(cfg.optimizer) else ""
    value = f"{what}lambda_max {lam:.4g} vs limit {limit:.4g} (ratio {r:.3g})"
    hard = not sharpness.preconditioned(cfg.optimizer)
    verdict = WILL_DIVERGE if (r >= 1 and hard) else AT_RISK if r >= (RATIO_AT_RISK if hard else 1.0) else OK
    safe_lr = lr * RATIO_AT_RISK / r if r > 0 else lr
    return judge("sharpness", value, verdict, f"optimizer.lr={safe_lr:.3g} (ratio {RATIO_AT_RISK}), stabilizer=clip",
                 bound)


def propagation_risks(layers: List[LayerScale], bound: Optional[str], model_name: str) -> List[Risk]:
    """Activation growth along the forward pass, gradient growth along the backward pass: where a
    scale grows, by how much in all and per layer. At risk from GROWTH_AT_RISK (x10)."""
    remedy = ("model.init=default or model.gain=1.0, model.norm=layernorm"
              + (", model.residual=true" if model_name == "deep_mlp" else "") + ", stabilizer=clip")
    out = []
    for name, order, scale in (("activation growth", layers, lambda s: s.act_rms),
                               ("gradient growth", layers[::-1], lambda s: s.grad_rms)):
        g, i, j = growth([scale(s) for s in order])
        value = f"x{g:.3g} from {order[i].name} to {order[j].name} (x{g ** (1 / (j - i)):.3g} per layer)" if j > i \
            else "no growth"
        out.append(judge(name, value, AT_RISK if g >= GROWTH_AT_RISK else OK, remedy, bound))
    return out


def recurrent_risk(rg: float, bound: Optional[str]) -> Risk:
    verdict = AT_RISK if not rg < GROWTH_AT_RISK else OK  # NaN/inf: at risk
    return judge("recurrent growth", f"|d h_T / d h_0| up to {rg:.3g}", verdict,
                 "model.recurrent_gain=1.0, model=lstm, stabilizer=clip", bound)


def first_batches(trainer, n: int = BATCHES):
    """The run's first ``n`` batches, without advancing its data order (a copy of its generator)."""
    gen = torch.Generator()
    gen.set_state(trainer.order.generator.get_state())
    perm = trainer.order.perm if trainer.order.perm is not None else torch.randperm(trainer.order.n, generator=gen)
    batches = trainer.train_data.shuffled_batches(trainer.cfg.trainer.batch_size, perm, trainer.order.batch)
    return [b for _, b in zip(range(n), batches)]


def preflight(trainer) -> Report:
    """The report for ``trainer``'s run, before its next update (its first, unless resumed)."""
    with sharpness.native_kernels():
        return _report(trainer)


def _report(trainer) -> Report:
    cfg, engine = trainer.cfg, trainer.engine
    batches = first_batches(trainer)
    smooth = cfg.loss.label_smoothing
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = layer_scales(engine.model, *batches[0], smooth)
    params = [p for p in engine.model.parameters() if p.requires_grad]
    scale = None
    if sharpness.preconditioned(cfg.optimizer):  # v from the batches' squared gradients (Adam's first steps)
        sq = [sum(g.detach() ** 2 for g in gs) / len(batches) for gs in
              zip(*[sharpness.loss_hvp(engine.model, x, y, smooth)[0] for x, y in batches])]
        scale = sharpness.preconditioner(engine.optimizer, params, cfg.optimizer, sq)
    lams = []
    for x, y in batches:
        grads, hvp = sharpness.loss_hvp(engine.model, x, y, smooth)
        lam, _ = sharpness.lanczos(sharpness.scaled(hvp, scale), sharpness.random_vector(grads, gen),
                                   sharpness.COLD_PRODUCTS)
        lams.append(float(lam))
    lam = max(lams, key=lambda v: v if math.isfinite(v) else math.inf)
    lr = engine.schedule.lr if engine.step_count else float(cfg.optimizer.lr)
    limit = sharpness.stability_limit(cfg.optimizer, lr)
    rg = recurrent_growth(engine.model, batches[0][0], generator=gen)
    report = Report(layers, lam, limit, lr, float(rg) if rg is not None else None)
    bound = bounded_by(engine.stack)
    report.risks = [sharpness_risk(cfg, lam, limit, lr, bound), *propagation_risks(layers, bound, cfg.model.name)]
    if report.recurrent is not None:
        report.risks.append(recurrent_risk(report.recurrent, bound))
    return report


def log_report(run, report: Report, out_dir) -> None:
    """Metrics ``preflight/...`` at step 0, tags ``preflight/verdict`` (and one per risk), and the
    table as the artifact ``preflight.txt``."""
    from pathlib import Path

    run.log_metrics(report.metrics(), step=0, timestamp_ms=int(time.time() * 1000))
    run.set_tags(report.tags())
    path = Path(out_dir) / "preflight.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.table() + "\n")
    run.log_artifact(path)


def diagnose(cfg, out_dir) -> Report:
    """``python src/diagnose.py``: the preflight report of the run ``cfg`` describes, printed and logged
    as its own MLflow run (tag ``kind=preflight``), without training it."""
    from .tracking import RunLogger, flatten, run_name, run_tags, tracking_uri
    from .training import Trainer

    trainer = Trainer(cfg, out_dir)
    report = preflight(trainer)
    run = RunLogger.start(tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, f"{run_name(cfg)}-preflight",
                          {**run_tags(cfg, trainer.device, trainer.data_checksum), "kind": "preflight"},
                          cfg.tracking.parent_run_id)
    try:
        run.log_params(flatten(cfg))
        log_report(run, report, out_dir)
    except BaseException:
        run.close_after_error("FAILED")
        raise
    run.close("FINISHED")
    report.run_id = run.run_id
    return report
