"""Models, from well-behaved (mlp, cnn, lstm) to explosion-prone (deep_mlp, rnn).

Every model takes images [B, 1, 28, 28] and returns logits [B, 10]; the
sequence models read them row by row (28 steps) or pixel by pixel (784 steps).
The last layer is always named ``head`` so remedies (AGC) can exclude it.
"""
from __future__ import annotations


import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


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


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        sizes = [784, *cfg.hidden_sizes]
        self.layers = nn.Sequential(*[mlp_block(a, b, cfg) for a, b in zip(sizes, sizes[1:])])
        self.head = nn.Linear(sizes[-1], 10)

    def forward(self, x):
        return self.head(self.layers(x.flatten(1)))


class DeepMLP(nn.Module):
    """784 -> width x depth -> 10; with ``residual`` each hidden block is x + f(x)."""

    def __init__(self, cfg):
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


class CNN(nn.Module):
    def __init__(self, cfg):
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


class SequenceClassifier(nn.Module):
    """RNN or LSTM over image rows/pixels; classifies from the last hidden state."""

    def __init__(self, cfg, sequence: str, cell: str):
        super().__init__()
        self.sequence = sequence
        n_in = 28 if sequence == "rows" else 1
        if cell == "lstm":
            self.rnn = nn.LSTM(n_in, cfg.hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(n_in, cfg.hidden, nonlinearity=cfg.nonlinearity, batch_first=True)
        self.norm = norm_layer(cfg.norm, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 10)

    def forward(self, x):
        seq = x.view(x.shape[0], 28, 28) if self.sequence == "rows" else x.view(x.shape[0], 784, 1)
        out, _ = self.rnn(seq)
        return self.head(self.norm(out[:, -1]))


def init_weights(model: nn.Module, cfg) -> None:
    """Apply ``model.init`` scaled by ``model.gain`` to every Linear/Conv weight (biases -> 0)."""
    if cfg.init == "default" and cfg.gain == 1.0:
        return
    nonlinearity = cfg.activation if cfg.activation in ("relu", "tanh", "sigmoid") else "relu"
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
    name = cfg_model.name
    if name == "mlp":
        model = MLP(cfg_model)
    elif name == "deep_mlp":
        model = DeepMLP(cfg_model)
    elif name == "cnn":
        model = CNN(cfg_model)
    elif name in ("rnn", "lstm"):
        model = SequenceClassifier(cfg_model, cfg_data.sequence, name)
    else:  # guarded by config.check
        raise ValueError(f"unknown model {name}")
    init_weights(model, cfg_model)
    if name in ("rnn", "lstm"):
        init_recurrent(model.rnn, cfg_model)
    return model
