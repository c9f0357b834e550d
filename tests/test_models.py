"""Each registered model: the architecture its knobs describe, and its initialization."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose
from gradlab.models import build_model
from gradlab.registry import MODELS


def model_of(*overrides: str):
    cfg = compose(["data=synthetic", *overrides])
    return build_model(cfg.model, cfg.data)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("sequence", ["rows", "pixels"])
def test_every_model_maps_images_to_logits(name, sequence):
    model = model_of(f"model={name}", f"data.sequence={sequence}")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert any(n.startswith("head.") for n, _ in model.named_parameters())  # AGC's "auto" exclusion


def test_mlp_layer_sizes():
    model = model_of("model=mlp", "model.hidden_sizes=[64,32]", "model.norm=layernorm", "model.dropout=0.1")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2


def test_deep_mlp_depth_residual_and_kaiming_gain():
    torch.manual_seed(0)
    model = model_of("model=deep_mlp", "model.depth=5", "model.width=64", "model.gain=2.0")
    assert len(model.blocks) == 4 and not model.residual
    # kaiming (its default init) x gain: weight std = gain * sqrt(2 / fan_in)
    w = torch.cat([b[0].weight.detach().flatten() for b in model.blocks])
    assert float(w.std()) == pytest.approx(2.0 * (2 / 64) ** 0.5, rel=0.05)
    assert all(float(b[0].bias.detach().abs().max()) == 0 for b in model.blocks)
    residual = model_of("model=deep_mlp", "model.depth=5", "model.width=64", "model.residual=true")
    x = torch.randn(3, 1, 28, 28)
    h = residual.act(residual.stem(x.flatten(1)))
    for block in residual.blocks:
        h = h + block(h)
    torch.testing.assert_close(residual(x), residual.head(h))


def test_cnn_channels_and_pool():
    model = model_of("model=cnn", "model.channels=[8]", "model.pool=avg", "model.norm=batchnorm")
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [8]
    assert any(isinstance(m, nn.AvgPool2d) for m in model.modules())
    assert model.fc[0].in_features == 8 * 14 * 14
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("init", ["orthogonal", "identity"])
def test_rnn_recurrent_init_and_nonlinearity(init):
    model = model_of("model=rnn", f"model.recurrent_init={init}", "model.recurrent_gain=1.5", "model.hidden=16",
                     "model.nonlinearity=relu")
    w = model.rnn.weight_hh_l0.detach()
    torch.testing.assert_close(torch.linalg.svdvals(w), torch.full((16,), 1.5))  # rho = gain
    if init == "identity":  # IRNN (Le et al. 2015): W_hh = gain x I, recurrent biases 0
        torch.testing.assert_close(w, 1.5 * torch.eye(16))
        assert float(model.rnn.bias_hh_l0.detach().abs().max()) == 0
    assert model.rnn.nonlinearity == "relu"


def test_lstm_recurrent_init_per_gate():
    model = model_of("model=lstm", "model.recurrent_init=identity", "model.recurrent_gain=0.5", "model.hidden=8")
    w = model.rnn.weight_hh_l0.detach()  # [4 * hidden, hidden]: one square block per gate
    for gate in w.view(4, 8, 8):
        torch.testing.assert_close(gate, 0.5 * torch.eye(8))
    default = model_of("model=lstm", "model.hidden=8")
    assert not torch.equal(default.rnn.weight_hh_l0.detach().view(4, 8, 8)[0], torch.eye(8))
