"""Models, from well-behaved (mlp, cnn, lstm) to explosion-prone (deep_mlp, rnn, vit at a high LR).

Every model takes images [B, 1, 28, 28] and returns logits [B, 10]; the
sequence models read them row by row (28 steps) or pixel by pixel (784 steps, or fewer
after ``model.downsample``); the vision transformer reads patches.
The last layer is always named ``head`` so remedies (AGC) can exclude it.
Each model registers here with its own schema: a knob that does not apply to a
model (``model.residual`` on the RNN) is an unknown key at composition time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
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


def _divides_28(value: int, key: str) -> None:
    need(value >= 1 and 28 % value == 0, key, f"must divide 28 (1, 2, 4, 7, 14 or 28), got {value}")


@dataclass
class LSTMConfig(ModelSchema):
    name: str = "lstm"
    hidden: int = 128
    recurrent_init: str = choice("default", "orthogonal", "identity")  # of W_hh (per gate)
    recurrent_gain: float = 1.0  # scale of W_hh (rho)
    downsample: int = 1  # average-pool the image by this factor first (pixels, 2: 14 x 14 = 196 steps)

    def check(self) -> None:
        super().check()
        need(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")
        need(self.recurrent_gain > 0, "recurrent_gain", f"must be > 0, got {self.recurrent_gain}")
        _divides_28(self.downsample, "downsample")


@dataclass
class RNNConfig(LSTMConfig):
    name: str = "rnn"
    nonlinearity: str = choice("tanh", "relu")
    recurrent_init: str = choice("orthogonal", "default", "identity")


@dataclass
class ViTConfig(ModelSchema):
    name: str = "vit"
    norm: str = choice("layernorm", "none")  # pre-LN blocks and a final LayerNorm; none: no LayerNorm at all
    patch: int = 7  # square patches: (28 / patch)^2 tokens of patch^2 pixels
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2  # hidden width of each block's MLP = mlp_ratio * dim
    qk_norm: bool = False  # LayerNorm on each head's queries and keys (Dehghani et al. 2023)
    logit_softcap: Optional[float] = None  # attention logits -> c tanh(logits / c) (Gemma 2: 50); null: off

    def check(self) -> None:
        super().check()
        _divides_28(self.patch, "patch")
        need(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        need(self.heads >= 1 and self.dim >= 1 and self.dim % self.heads == 0, "heads",
             f"must divide dim ({self.dim}), got {self.heads}")
        need(self.mlp_ratio >= 1, "mlp_ratio", f"must be >= 1, got {self.mlp_ratio}")
        need(self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap",
             f"must be > 0 (or null: off), got {self.logit_softcap}")


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
        self.sequence, self.downsample = data.sequence, cfg.downsample
        n_in = 28 // cfg.downsample if self.sequence == "rows" else 1
        if cfg.name == "lstm":
            self.rnn = nn.LSTM(n_in, cfg.hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(n_in, cfg.hidden, nonlinearity=cfg.nonlinearity, batch_first=True)
        self.norm = norm_layer(cfg.norm, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 10)

    def as_sequence(self, x):
        """Images [B, 1, 28, 28] (average-pooled by ``downsample``) -> the sequences the recurrent
        layer reads, [B, T, features]."""
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        side = x.shape[-1]
        return x.reshape(x.shape[0], side, side) if self.sequence == "rows" else x.reshape(x.shape[0], side * side, 1)

    def forward(self, x):
        out, _ = self.rnn(self.as_sequence(x))
        return self.head(self.norm(out[:, -1]))


class Attention(nn.Module):
    """Multi-head self-attention with its logits computed in the open (not F.scaled_dot_product_attention,
    which hides them): logits = q k^T / sqrt(d_head), with q, k LayerNorm'ed per head (``qk_norm``:
    Dehghani et al. 2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322) and soft-capped
    to c tanh(logits / c) (``logit_softcap``: Gemma 2, arXiv 2408.00118). Each forward writes its
    largest logit (before the cap: the growth the cap hides from the softmax) into the buffer
    ``logit_max``, which the telemetry reads without a host sync."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, softcap: Optional[float]):
        super().__init__()
        self.heads, self.softcap = heads, softcap
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.register_buffer("logit_max", torch.zeros(()), persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        if not torch._C._functorch.is_functorch_wrapped_tensor(logits):  # not inside torch.func (the gauge)
            self.logit_max.copy_(logits.detach().amax())
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = norm_layer(cfg.norm, cfg.dim), norm_layer(cfg.norm, cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qk_norm, cfg.logit_softcap)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@MODELS.register("vit", ViTConfig)
class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021): the image as (28 / patch)^2 patch tokens
    (a linear embedding plus a learned position embedding), ``depth`` pre-LN blocks, mean pooling,
    a final LayerNorm and the ``head``. ``probes()`` names each block's largest attention logit."""

    def __init__(self, cfg, data=None):
        super().__init__()
        self.patch = cfg.patch
        self.embed = nn.Linear(cfg.patch ** 2, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, (28 // cfg.patch) ** 2, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = norm_layer(cfg.norm, cfg.dim)
        self.head = nn.Linear(cfg.dim, 10)

    def forward(self, x):
        tokens = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # [B, patches, patch^2]
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))

    def probes(self) -> Dict[str, torch.Tensor]:
        return {f"attn/logit_max/{i}": block.attn.logit_max for i, block in enumerate(self.blocks)}


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
