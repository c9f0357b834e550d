"""The standing side-by-side benchmark (`make bench`): gradlab against the floor and against its peers.

    python benchmarks/suite.py [--models mlp cnn] [--steps 40] [--rounds 7] [--out reports/bench.json]

Per optimizer step, the same model (gradlab's mlp / cnn), Adam, batch 128, one torch thread:

  bare            resident tensors: zero_grad, forward, loss, backward, step; no clip, no logging (the floor),
                  torch.optim.Adam with torch's defaults (what a hand-written loop uses)
  bare+clip       the same + torch.nn.utils.clip_grad_norm_
  gradlab.step    StepEngine.step: full default telemetry + clip (and its host copy every log_every steps)
  gradlab.step/fused   the same with optimizer.fused=true (torch's fused Adam kernel)
  gradlab.fit     Trainer.fit with clip, MLflow included (its time/step_ms: the loop, flushes and logging)
  examples        pytorch/examples style: torchvision MNIST + DataLoader(num_workers=1), ToTensor/Normalize per item
  lightning/50    Lightning Trainer + MLFlowLogger on a TensorDataset DataLoader, logging every 50 steps
  lightning/1     ... logging every step                       (the two need `pip install -e '.[lightning]'`)

Interleaved rounds: every round runs each variant for --steps steps (fit and Lightning: whole short
runs, timed per step from inside), so drift on a shared machine hits them all alike. Reported per
variant: the median (min-max) over rounds of its wall time per step relative to `bare` in the same
round, and its CPU time per step (this process and its children: the DataLoader's worker counts).
Then MLflow throughput, lossless, into a fresh SQLite store: gradlab's batched logger vs
MlflowClient.log_metric per point vs Lightning's MLFlowLogger. Writes JSON (--out) and prints the
README's Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import psutil  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradlab.config import compose_config  # noqa: E402
from gradlab.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time of this process and its children (a DataLoader's workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


# ---------------------------------------------------------------- the variants: each returns run(n) -> None
def resident(cfg, n: int):
    from gradlab.data import DeviceData, load_splits

    splits = load_splits(cfg.data, log=lambda _: None)
    return DeviceData(splits["train_x"][:n], splits["train_y"][:n], torch.device("cpu"))


def bare(cfg, clip: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = resident(cfg, 8192)
    batches = list(data.batches(cfg.trainer.batch_size))
    state = {"i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    return run


def gradlab_step(cfg, tmp: Path):
    from gradlab.training import Trainer

    trainer = Trainer(cfg, tmp / "step")
    engine = trainer.engine
    batches = list(trainer.train_data.batches(cfg.trainer.batch_size))[:64]
    state = {"i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            engine.step(x, y)
            if engine.recorder.full:
                engine.recorder.flush()

    return run


def gradlab_fit(cfg, tmp: Path):
    from omegaconf import OmegaConf

    from gradlab.training import Trainer

    state = {"run": 0}

    def run(n: int) -> float:
        c = cfg.copy()
        OmegaConf.update(c, "trainer.max_steps", n)
        state["run"] += 1
        t = Trainer(c, tmp / f"fit{state['run']}")
        t.fit()
        return t.train_seconds / n  # the loop alone: fixed costs are the fixed-cost benchmark's

    return run


def examples_style(cfg, tmp: Path):
    """pytorch/examples/mnist: torchvision's dataset, transforms per item, a DataLoader worker."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from gradlab.data import fetch

    raw = fetch("mnist", tmp / "data", log=lambda _: None)
    tv = tmp / "tv" / "MNIST" / "raw"
    tv.mkdir(parents=True, exist_ok=True)
    for f in raw.iterdir():
        (tv / f.name).unlink(missing_ok=True)
        (tv / f.name).symlink_to(f)
    ds = datasets.MNIST(tmp / "tv", train=True, download=False,
                        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    loader = DataLoader(ds, batch_size=cfg.trainer.batch_size, shuffle=True, num_workers=1, persistent_workers=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"it": iter(loader)}

    def run(n: int) -> None:
        for _ in range(n):
            try:
                x, y = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                x, y = next(state["it"])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return run


def lightning(cfg, tmp: Path, every: int):
    try:
        import lightning as L
        from lightning.pytorch.loggers import MLFlowLogger
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    data = resident(cfg, 8192)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=cfg.trainer.batch_size, shuffle=True)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model(cfg.model, cfg.data)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.start = self.start if hasattr(self, "start") else time.perf_counter()

        def on_train_batch_end(self, trainer, *a):
            self.end, self.steps = time.perf_counter(), trainer.global_step

    state = {"run": 0}

    def run(n: int) -> float:
        state["run"] += 1
        clock = Clock()
        logger = MLFlowLogger(experiment_name="bench", tracking_uri=f"sqlite:///{tmp / 'lightning.db'}")
        trainer = L.Trainer(max_steps=n + 1, logger=logger, log_every_n_steps=every, callbacks=[clock],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", default_root_dir=str(tmp / f"lt{state['run']}"))
        trainer.fit(Module(), loader)
        return (clock.end - clock.start) / n  # from the first batch: Lightning's set-up is not a step

    return run


# ---------------------------------------------------------------- timing
def interleave(variants: dict, rounds: int, steps: int) -> dict:
    """Per variant: wall seconds per step and CPU seconds per step, one value per round."""
    out = {v: {"wall": [], "cpu": []} for v in variants}
    for run in variants.values():
        run(5)  # warm up: allocator, optimizer state, workers
    for _ in range(rounds):
        for name, run in variants.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            inner = run(steps)
            wall = time.perf_counter() - t0
            cpu = cpu_seconds() - c0
            per_step = inner if isinstance(inner, float) else wall / steps
            out[name]["wall"].append(per_step)
            out[name]["cpu"].append(cpu / steps if inner is None else cpu / steps * per_step / (wall / steps))
    return out


def summarize(times: dict) -> dict:
    base = times["bare"]["wall"]
    rows = {}
    for name, t in times.items():
        ratios = [w / b for w, b in zip(t["wall"], base)]
        rows[name] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "wall_ms": 1000 * statistics.median(t["wall"]), "cpu_ms": 1000 * statistics.median(t["cpu"])}
    return rows


def mlflow_throughput(tmp: Path, points: int = 6000) -> dict:
    """Points per second into a fresh SQLite store, every point stored (checked)."""
    from mlflow import MlflowClient

    from gradlab.tracking import RunLogger, ensure_store

    out = {}
    uri = f"sqlite:///{tmp / 'tput.db'}"
    client = ensure_store(uri)
    exp = client.create_experiment("tput")

    run = RunLogger.start(uri, "tput", "batched", {})
    t0 = time.perf_counter()
    run.log_points([(f"m{i % 6}", float(i), i // 6) for i in range(points)], 0)
    run.flush()
    out["gradlab batched (log_batch chunks of 1000)"] = points / (time.perf_counter() - t0)
    assert sum(len(client.get_metric_history(run.run_id, f"m{k}")) for k in range(6)) == points

    n = 300
    rid = client.create_run(exp).info.run_id
    t0 = time.perf_counter()
    for i in range(n):
        client.log_metric(rid, f"m{i % 6}", float(i), step=i // 6)
    out["MlflowClient.log_metric per point"] = n / (time.perf_counter() - t0)

    try:
        from lightning.pytorch.loggers import MLFlowLogger
    except ImportError:
        return out
    logger = MLFlowLogger(experiment_name="tput-lightning", tracking_uri=uri)
    steps = 200
    t0 = time.perf_counter()
    for s in range(steps):
        logger.log_metrics({f"m{k}": float(s) for k in range(6)}, step=s)
    logger.finalize("success")
    out["Lightning MLFlowLogger (6 metrics per call)"] = 6 * steps / (time.perf_counter() - t0)
    assert len(MlflowClient(uri).get_metric_history(logger.run_id, "m0")) == steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="reports/bench.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gradlab-bench-"))
    os.environ.setdefault("GRADLAB_DATA_MIRROR", str((ROOT.parent / "shared" / "data" / "mnist").resolve()))
    result = {"device": "cpu", "torch": torch.__version__, "threads": 1, "batch_size": 128, "rounds": args.rounds,
              "steps_per_round": args.steps, "cpu": torch.backends.cpu.get_cpu_capability(), "models": {}}
    for model in args.models:
        cfg = compose_config([f"model={model}", "stabilizer=clip", "trainer.device=cpu", "trainer.progress=false",
                              f"data.root={tmp / 'data'}", f"tracking.uri=sqlite:///{tmp / 'gradlab.db'}",
                              "trainer.checkpoint_every=0", "telemetry.plots=false", "trainer.threads=1"])
        fused = cfg.copy()
        OmegaConf.update(fused, "optimizer.fused", True)
        variants = {"bare": bare(cfg, clip=False), "bare+clip": bare(cfg, clip=True),
                    "gradlab.step": gradlab_step(cfg, tmp), "gradlab.step/fused": gradlab_step(fused, tmp), "gradlab.fit": gradlab_fit(cfg, tmp),
                    "examples": examples_style(cfg, tmp)}
        for every in (50, 1):
            run = lightning(cfg, tmp, every)
            if run is not None:
                variants[f"lightning/{every}"] = run
        result["models"][model] = summarize(interleave(variants, args.rounds, args.steps))
    result["mlflow_points_per_s"] = mlflow_throughput(tmp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    models = list(result["models"])
    head = " | ".join(f"{m} (bare {result['models'][m]['bare']['wall_ms']:.2f} ms)" for m in models)
    lines = [f"| per optimizer step | {head} |", "|---|" + "---|" * len(models)]
    for v in result["models"][models[0]]:
        cells = []
        for m in models:
            r = result["models"][m].get(v)
            cells.append("—" if r is None else f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}), "
                                              f"CPU {r['cpu_ms']:.1f} ms")
        lines.append(f"| {v} | {' | '.join(cells)} |")
    lines += ["", "| MLflow logging | points/s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in result["mlflow_points_per_s"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
