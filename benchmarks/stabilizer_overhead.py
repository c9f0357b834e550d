"""Step-time overhead of each stabilizer relative to `none`, measured side by side in one run.

    python benchmarks/stabilizer_overhead.py [--models mlp cnn] [--steps 40] [--rounds 7] [--device auto]

Each variant gets its own Trainer (same data, same model); the timed loop interleaves the
variants round by round, so drift on a shared machine hits them all alike. Reported: the
median over rounds of (variant's time per step / none's time per step in the same round).
Prints a Markdown table (the one in the README).
"""
from __future__ import annotations

import statistics

from bench import arguments, interleaved, median_ratios, one_batch, trainers

VARIANTS = ["none", "clip", "clip_value", "agc", "adagc", "autoclip", "zclip", "spam", "spike_skip", "[warmup,clip]",
            "[agc,zclip,spike_skip]"]


def stepper(engine, x, y, steps: int):
    def run():
        for _ in range(steps):
            engine.step(x, y)
            if engine.recorder.full:
                engine.recorder.flush()  # the once-per-interval host copy is part of the cost
    return run


def main() -> None:
    args = arguments(__doc__, steps=40, rounds=7)
    rows = []
    for model in args.models:
        built = trainers({v: [f"stabilizer={v}"] for v in VARIANTS},
                         [f"model={model}", f"trainer.device={args.device}", f"trainer.batch_size={args.batch_size}"])
        runs = {}
        for v, trainer in built.items():
            x, y = one_batch(trainer, args.batch_size)
            stepper(trainer.engine, x, y, 30)()  # warm up: allocator, optimizer state, adaptive histories
            runs[v] = stepper(trainer.engine, x, y, args.steps)
        device = next(iter(built.values())).device
        times = interleaved(runs, args.rounds, device)
        ratios = median_ratios(times, "none")
        base_ms = statistics.median(times["none"]) / args.steps * 1000
        rows += [(model, v, ratios[v], base_ms, str(device)) for v in VARIANTS]
    print(f"| model | stabilizer | step time vs none (median of {args.rounds} rounds) | none ms/step | device |")
    print("|---|---|---|---|---|")
    for model, v, r, base, dev in rows:
        print(f"| {model} | {v} | {r:.3f}x | {base:.2f} | {dev} |")


if __name__ == "__main__":
    main()
