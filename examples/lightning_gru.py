"""gradlab in PyTorch Lightning: a GRU reading MNIST row by row (not one of gradlab's models),
its gradients watched and stabilized by ``gradlab.lightning.GradlabCallback``.

    pip install -e '.[lightning]'
    python examples/lightning_gru.py                          # clip, logged through Lightning's MLFlowLogger
    python examples/lightning_gru.py --stabilizers none --lr 0.05
    python examples/lightning_gru.py --gradlab-logger         # no Lightning logger: gradlab's own run

Leave ``gradient_clip_val`` unset: gradlab's ``clip`` is the same formula, and the callback
records the norm before and after it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import accuracy, mnist, report

from gradlab.lightning import GradlabCallback
from gradlab.tracking import tracking_uri


class GRUClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.gru = nn.GRU(28, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.gru(x.view(len(x), 28, 28))  # 28 steps of one 28-pixel row
        return self.classifier(out[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stabilizers", nargs="*", default=["clip"], help="gradlab stabilizer names ('none': no remedy)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiment", default="gradlab-examples")
    ap.add_argument("--gradlab-logger", action="store_true", help="log through gradlab's run, not MLFlowLogger")
    args = ap.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    data = mnist()
    loader = DataLoader(TensorDataset(*data["train"]), batch_size=128, shuffle=True)
    name = f"gru-{'+'.join(args.stabilizers)}-lr{args.lr:g}-s{args.seed}"
    callback = GradlabCallback(args.stabilizers, tracking={"experiment": args.experiment, "run_name": name},
                               out_dir=Path("outputs") / "examples" / name)
    logger = False if args.gradlab_logger else pl.loggers.MLFlowLogger(
        experiment_name=args.experiment, run_name=name, tracking_uri=tracking_uri())
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=logger, callbacks=[callback],
                         enable_checkpointing=False, log_every_n_steps=25, enable_progress_bar=False)
    model = GRUClassifier(lr=args.lr)
    trainer.fit(model, loader)
    model.eval()
    test_accuracy = accuracy(model, *data["test"])
    callback.monitor.run.client.log_metric(callback.result.run_id, "test/accuracy", test_accuracy)
    report(data["name"], callback.result, test_accuracy)


if __name__ == "__main__":
    main()
