"""Step-time overhead of each stabilizer relative to `none`, measured side by side in one run.

    python benchmarks/stabilizer_overhead.py [--models mlp cnn] [--steps 40] [--rounds 7] [--device auto]

Each variant gets its own Trainer (same data, same model); the timed loop interleaves the
variants round by round, so drift on a shared machine hits them all alike. Reported: the
median over rounds of (variant's time per step / none's time per step in the same round).
Prints a Markdown table (the one in the README).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from gradlab.config import register_configs  # noqa: E402
from gradlab.training import Trainer  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
VARIANTS = ["none", "clip", "clip_value", "agc", "adagc", "autoclip", "zclip", "spam", "spike_skip", "[warmup,clip]",
            "[agc,zclip,spike_skip]"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_args(doc: str) -> argparse.Namespace:
    """The options every side-by-side benchmark here takes."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    return ap.parse_args()


def interleaved(steps: dict, base: str, rounds: int, n: int, device: torch.device) -> tuple:
    """Time ``n`` calls of each step function per round, the variants one after the other in every
    round; returns (median ms per call of ``base``, {variant: median ratio to ``base``})."""
    ratios = {v: [] for v in steps}
    base_ms = []
    for _ in range(rounds):
        per_step = {}
        for v, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync(device)
            per_step[v] = (time.perf_counter() - t0) / n
        base_ms.append(per_step[base] * 1000)
        for v in steps:
            ratios[v].append(per_step[v] / per_step[base])
    return statistics.median(base_ms), {v: statistics.median(r) for v, r in ratios.items()}


def step_and_flush(engine, x, y) -> None:
    engine.step(x, y)
    if engine.recorder.full:
        engine.recorder.flush()  # the once-per-interval host copy is part of the cost


def main() -> None:
    args = bench_args(__doc__)
    register_configs()
    tmp = tempfile.mkdtemp()
    rows = []
    with initialize_config_dir(CONF, version_base="1.3"):
        for model in args.models:
            trainers = {}
            for v in VARIANTS:
                cfg = compose("config", overrides=[
                    f"model={model}", f"stabilizer={v}", "data=synthetic", "data.synthetic_size=4096",
                    f"trainer.device={args.device}", f"trainer.batch_size={args.batch_size}",
                    f"tracking.uri=sqlite:///{tmp}/bench.db", "telemetry.plots=false"])
                trainer = Trainer(cfg, Path(tmp) / v)
                data = trainer.train_data
                x, y = next(data.shuffled_batches(args.batch_size, torch.randperm(len(data))))
                t = trainer.engine
                for _ in range(30):  # warm up: allocator, optimizer state, adaptive histories
                    step_and_flush(t, x, y)
                trainers[v] = (t, x, y)
            device = next(iter(trainers.values()))[0].device
            base_ms, ratios = interleaved({v: functools.partial(step_and_flush, *tx) for v, tx in trainers.items()},
                                          "none", args.rounds, args.steps, device)
            for v in VARIANTS:
                rows.append((model, v, ratios[v], base_ms, str(device)))
    print(f"| model | stabilizer | step time vs none (median of {args.rounds} rounds) | none ms/step | device |")
    print("|---|---|---|---|---|")
    for model, v, r, base, dev in rows:
        print(f"| {model} | {v} | {r:.3f}x | {base:.2f} | {dev} |")


if __name__ == "__main__":
    main()
