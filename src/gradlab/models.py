"""Models, from well-behaved (mlp, cnn, lstm) to explosion-prone (deep_mlp, rnn).

Every model takes images [B, 1, 28, 28] and returns logits [B, 10]; the
sequence models read them row by row (28 steps) or pixel by pixel (784 steps).
The last layer is always named ``head`` so remedies (AGC) can exclude it.
Each model registers here with its own schema: a knob that does not apply to a
model (``model.residual`` on the RNN) is an unknown key at composition time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from .registry import MODELS, Schema, choice, need

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
INITS = ("default", "xavier", "kaiming", "orthogonal")  # default: PyTorch's own init
NORMS = ("none", "batchnorm", "layernorm")


@dataclass
class ModelSchema(Schema):
    """Knobs every model has: its weight init (scaled by ``gain``) and normalization."""

    name: str = ""
    init: str = choice(*INITS)
    gain: float = 1.0  # multiplies the init scale; > 1 shows what a bad init does
    norm: str = choice(*NORMS)

    def check(self) -> None:
        need(self.gain > 0, "gain", f"must be > 0, got {self.gain}")


@dataclass
class FeedForwardSchema(ModelSchema):
    activation: str = choice(*ACTIVATIONS)
    dropout: float = 0.0

    def check(self) -> None:
        super().check()
        need(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class MLPConfig(FeedForwardSchema):
    name: str = "mlp"
    hidden_sizes: List[int] = field(default_factory=lambda: [512, 256])

    def check(self) -> None:
        super().check()
        need(len(self.hidden_sizes) > 0 and min(self.hidden_sizes) >= 1, "hidden_sizes", "needs sizes >= 1")


@dataclass
class DeepMLPConfig(FeedForwardSchema):
    name: str = "deep_mlp"
    depth: int = 20  # hidden layers
    width: int = 256
    residual: bool = False  # x + f(x) blocks
    init: str = choice("kaiming", *(i for i in INITS if i != "kaiming"))

    def check(self) -> None:
        super().check()
        need(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        need(self.width >= 1, "width", f"must be >= 1, got {self.width}")


@dataclass
class CNNConfig(FeedForwardSchema):
    name: str = "cnn"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    pool: str = choice("max", "avg")

    def check(self) -> None:
        super().check()
        need(1 <= len(self.channels) <= 4 and min(self.channels) >= 1, "channels",
             "needs 1 to 4 channel counts >= 1 (each block halves the 28x28 image)")


@dataclass
class LSTMConfig(ModelSchema):
    name: str = "lstm"
    hidden: int = 128
    recurrent_init: str = choice("default", "orthogonal", "identity")  # of W_hh (per gate)
    recurrent_gain: float = 1.0  # scale of W_hh (rho)

    def check(self) -> None:
        super().check()
        need(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")
        need(self.recurrent_gain > 0, "recurrent_gain", f"must be > 0, got {self.recurrent_gain}")


@dataclass
class RNNConfig(LSTMConfig):
    name: str = "rnn"
    nonlinearity: str = choice("tanh", "relu")
    recurrent_init: str = choice("orthogonal", "default", "identity")


def norm_layer(kind: str, features: int, conv: bool = False) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)
    if kind == "layernorm":
        return nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)
    return nn.Identity()


def mlp_block(n_in: int, n_out: int, cfg) -> nn.Sequential:
    layers = [nn.Linear(n_in, n_out), norm_layer(cfg.norm, n_out), ACTIVATIONS[cfg.activation]()]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    return nn.Sequential(*layers)


@MODELS.register("mlp", MLPConfig)
class MLP(nn.Module):
    def __init__(self, cfg, data=None):
        super().__init__()
        sizes = [784, *cfg.hidden_sizes]
        self.layers = nn.Sequential(*[mlp_block(a, b, cfg) for a, b in zip(sizes, sizes[1:])])
        self.head = nn.Linear(sizes[-1], 10)

    def forward(self, x):
        return self.head(self.layers(x.flatten(1)))


@MODELS.register("deep_mlp", DeepMLPConfig)
class DeepMLP(nn.Module):
    """784 -> width x depth -> 10; with ``residual`` each hidden block is x + f(x)."""

    def __init__(self, cfg, data=None):
        super().__init__()
        self.residual = cfg.residual
        self.stem = nn.Linear(784, cfg.width)
        self.act = ACTIVATIONS[cfg.activation]()
        self.blocks = nn.ModuleList([mlp_block(cfg.width, cfg.width, cfg) for _ in range(cfg.depth - 1)])
        self.head = nn.Linear(cfg.width, 10)

    def forward(self, x):
        h = self.act(self.stem(x.flatten(1)))
        for block in self.blocks:
            h = h + block(h) if self.residual else block(h)
        return self.head(h)


@MODELS.register("cnn", CNNConfig)
class CNN(nn.Module):
    def __init__(self, cfg, data=None):
        super().__init__()
        pool = nn.MaxPool2d if cfg.pool == "max" else nn.AvgPool2d
        layers, c_in = [], 1
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), norm_layer(cfg.norm, c, conv=True),
                       ACTIVATIONS[cfg.activation](), pool(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = 28 // (2 ** len(cfg.channels))
        self.fc = mlp_block(c_in * side * side, 128, cfg)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.fc(self.features(x).flatten(1)))


@MODELS.register("lstm", LSTMConfig)
@MODELS.register("rnn", RNNConfig)
class SequenceClassifier(nn.Module):
    """RNN or LSTM over image rows/pixels (``data.sequence``); classifies from the last hidden state."""

    def __init__(self, cfg, data):
        super().__init__()
        self.sequence = data.sequence
        n_in = 28 if self.sequence == "rows" else 1
        if cfg.name == "lstm":
            self.rnn = nn.LSTM(n_in, cfg.hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(n_in, cfg.hidden, nonlinearity=cfg.nonlinearity, batch_first=True)
        self.norm = norm_layer(cfg.norm, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 10)

    def as_sequence(self, x):
        """Images [B, 1, 28, 28] -> the sequences the recurrent layer reads, [B, T, features]."""
        return x.view(x.shape[0], 28, 28) if self.sequence == "rows" else x.view(x.shape[0], 784, 1)

    def forward(self, x):
        out, _ = self.rnn(self.as_sequence(x))
        return self.head(self.norm(out[:, -1]))


def init_weights(model: nn.Module, cfg) -> None:
    """Apply ``model.init`` scaled by ``model.gain`` to every Linear/Conv weight (biases -> 0)."""
    if cfg.init == "default" and cfg.gain == 1.0:
        return
    activation = cfg.get("activation", "relu")
    nonlinearity = activation if activation in ("relu", "tanh", "sigmoid") else "relu"
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight
        with torch.no_grad():
            if cfg.init == "xavier":
                nn.init.xavier_normal_(w, gain=cfg.gain)
            elif cfg.init == "kaiming":
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
                w.mul_(cfg.gain)
            elif cfg.init == "orthogonal":
                nn.init.orthogonal_(w, gain=cfg.gain)
            else:  # default PyTorch init, rescaled
                w.mul_(cfg.gain)
            if m.bias is not None and cfg.init != "default":
                m.bias.zero_()


def init_recurrent(rnn: nn.Module, cfg) -> None:
    """W_hh = gain x orthogonal, or gain x identity (IRNN, Le et al. 2015)."""
    if cfg.recurrent_init == "default":
        return
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                for chunk in p.view(-1, p.shape[1], p.shape[1]):  # one square block per LSTM gate
                    if cfg.recurrent_init == "identity":
                        chunk.copy_(torch.eye(p.shape[1]) * cfg.recurrent_gain)
                    else:
                        nn.init.orthogonal_(chunk, gain=cfg.recurrent_gain)
            elif name.startswith("bias") and cfg.recurrent_init == "identity":
                p.zero_()


def build_model(cfg_model, cfg_data) -> nn.Module:
    model = MODELS[cfg_model.name].obj(cfg_model, cfg_data)
    init_weights(model, cfg_model)
    if isinstance(model, SequenceClassifier):  # after init_weights: this order fixes each seed's weights
        init_recurrent(model.rnn, cfg_model)
    return model
