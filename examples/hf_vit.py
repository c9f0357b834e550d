"""gradlab in the Hugging Face Trainer: a tiny Vision Transformer built from a config (no download,
not one of gradlab's models) on MNIST, its gradients watched and stabilized by
``gradlab.hf.GradlabCallback``.

    pip install -e '.[hf]'
    python examples/hf_vit.py                               # warmup + clip, gradlab's own MLflow run
    python examples/hf_vit.py --report-to mlflow            # the Trainer's MLflow run, gradlab's series added
    python examples/hf_vit.py --stabilizers none --lr 3e-2

``max_grad_norm=0``: the Trainer does not clip (gradlab's ``clip`` does, and records the norm
before and after); the Trainer still computes and logs ``grad_norm``, which equals gradlab's
``grad/norm`` at the same step.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from common import accuracy, mnist, report

from gradlab.hf import GradlabCallback
from gradlab.tracking import tracking_uri


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit() -> ViTForImageClassification:
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    return ViTForImageClassification(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stabilizers", nargs="*", default=["warmup", "clip"], help="gradlab stabilizer names")
    ap.add_argument("--warmup-steps", type=int, default=50, help="the warmup stabilizer's steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiment", default="gradlab-examples")
    ap.add_argument("--report-to", default="none", help="the Trainer's report_to (e.g. mlflow)")
    ap.add_argument("--out", default="outputs/examples/hf_vit")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = mnist()
    model = tiny_vit()
    name = f"vit-{'+'.join(args.stabilizers)}-lr{args.lr:g}-s{args.seed}"
    stabilizers = {s: ({"steps": args.warmup_steps} if s == "warmup" else {}) for s in args.stabilizers}
    if args.report_to == "mlflow":  # the Trainer's MLflowCallback reads these
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", args.experiment)
    callback = GradlabCallback(stabilizers, tracking={"experiment": args.experiment, "run_name": name},
                               out_dir=Path(args.out) / name)
    training = TrainingArguments(output_dir=args.out, run_name=name, max_steps=args.steps, learning_rate=args.lr,
                                 per_device_train_batch_size=128, max_grad_norm=0, lr_scheduler_type="constant",
                                 logging_steps=25, report_to=args.report_to, save_strategy="no", use_cpu=True,
                                 seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model, training, train_dataset=Images(*data["train"]), callbacks=[callback])
    trainer.train()
    model.eval()
    test_accuracy = accuracy(lambda x: model(pixel_values=x).logits, *data["test"])
    callback.monitor.run.client.log_metric(callback.result.run_id, "test/accuracy", test_accuracy)
    report(data["name"], callback.result, test_accuracy)


if __name__ == "__main__":
    main()
