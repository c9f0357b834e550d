"""Overhead of foresight (sharpness gauge + replay snapshots + the warning check) at the defaults,
measured side by side in one run against the telemetry alone.

    python benchmarks/foresight_overhead.py [--models mlp cnn] [--steps 200] [--rounds 5] [--device auto]

Both variants run the loop's per-step work on the same data and model: ``telemetry`` is
``StepEngine.step`` plus the recorder's flush every ``telemetry.log_every`` steps (what the loop did
before foresight); ``foresight`` adds what ``Trainer.fit`` now does around it: the gauge when due
(every ``telemetry.sharpness_every`` steps, warm-started), a flush after each measurement, the
warning check at every flush and a snapshot every ``forensics.snapshot_every`` steps. A round is
``--steps`` steps (a multiple of the gauge interval, so each round holds the same number of
measurements); the table gives the median over rounds of the per-round ratio, and, separately, the
one-time cost of the first (cold-started) measurement.
"""
from __future__ import annotations

import statistics
import time

from bench import arguments, interleaved, median_ratios, one_batch, trainers


def telemetry_only(trainer, x, y, steps: int):
    engine = trainer.engine

    def run():
        for _ in range(steps):
            engine.step(x, y)
            if engine.recorder.full:
                engine.recorder.flush()
    return run


def with_foresight(trainer, x, y, steps: int):
    engine, foresight, snapshots = trainer.engine, trainer.foresight, trainer.snapshots

    def run():
        for _ in range(steps):
            measured = foresight.before_step(engine.step_count, x, y)
            engine.step(x, y)
            if engine.recorder.full or measured:
                engine.recorder.flush()
                foresight.flush(engine.recorder.history)
                if snapshots.due(engine.step_count):
                    snapshots.take(engine, trainer.order)
    return run


def main() -> None:
    args = arguments(__doc__, steps=200, rounds=5)
    rows = []
    for model in args.models:
        built = trainers({"telemetry": ["telemetry.sharpness_every=0", "forensics.snapshot_every=0"],
                          "foresight": []},
                         [f"model={model}", f"trainer.device={args.device}", f"trainer.batch_size={args.batch_size}"])
        x, y = one_batch(built["telemetry"], args.batch_size)
        every = built["foresight"].cfg.telemetry.sharpness_every
        steps = max(every, args.steps // every * every)
        t0 = time.perf_counter()
        with_foresight(built["foresight"], x, y, 1)()  # the cold start: COLD_PRODUCTS Lanczos products
        cold_ms = (time.perf_counter() - t0) * 1000
        runs = {"telemetry": telemetry_only(built["telemetry"], x, y, steps),
                "foresight": with_foresight(built["foresight"], x, y, steps)}
        for run in runs.values():
            run()  # warm up (one round): allocator, optimizer state; the foresight variant is past its cold start
        times = interleaved(runs, args.rounds, built["telemetry"].device)
        ratio = median_ratios(times, "telemetry")["foresight"]
        base_ms = statistics.median(times["telemetry"]) / steps * 1000
        rows.append((model, ratio, base_ms, cold_ms, every, str(built["telemetry"].device)))
    print(f"| model | foresight vs telemetry (median of {args.rounds} rounds) | telemetry ms/step | "
          "first (cold) gauge, ms | sharpness_every | device |")
    print("|---|---|---|---|---|---|")
    for model, r, base, cold, every, dev in rows:
        print(f"| {model} | {r:.3f}x | {base:.2f} | {cold:.0f} | {every} | {dev} |")


if __name__ == "__main__":
    main()
