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


def test_rnn_downsample_shortens_the_pixel_sequence():
    model = model_of("model=rnn", "model.downsample=2", "data.sequence=pixels", "model.hidden=8")
    seen = []
    model.rnn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10) and seen[-1] == (3, 196, 1)  # 14 x 14 pixels
    pooled = x.view(3, 1, 14, 2, 14, 2).mean((3, 5)).reshape(3, 196, 1)  # each 2 x 2 block's mean, row-major
    torch.testing.assert_close(model(x), model.head(model.rnn(pooled)[0][:, -1]))
    rows = model_of("model=lstm", "model.downsample=4", "data.sequence=rows", "model.hidden=8")
    rows.rnn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    rows(x)
    assert seen[-1] == (3, 7, 7)


def vit(*overrides):
    torch.manual_seed(0)
    return model_of("model=vit", "model.dim=16", "model.heads=2", *overrides)


def test_vit_tokens_blocks_and_attention_equal_torch_sdpa():
    model = vit("model.patch=4", "model.depth=3")
    assert model.pos.shape == (1, 49, 16) and len(model.blocks) == 3
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2 * 3 + 1  # pre-LN blocks + final
    assert sum(isinstance(m, nn.LayerNorm) for m in vit("model.norm=none").modules()) == 0
    attn, x = model.blocks[0].attn.requires_grad_(False), torch.randn(5, 49, 16)
    q, k, v = attn.qkv(x).view(5, 49, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want = attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(5, 49, 16))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)
    assert float(attn.logit_max) == pytest.approx(float((q @ k.transpose(-2, -1) / 8 ** 0.5).max()), rel=1e-6)


def test_vit_qk_norm_bounds_the_attention_logits_and_softcap_caps_them():
    """Weights x 30 make the plain logits huge; with q and k LayerNorm'ed (unit gain) each logit is
    at most |q||k| / sqrt(d) = d / sqrt(d) = sqrt(8); the softcap bounds what the softmax sees."""
    x = torch.randn(4, 1, 28, 28)
    logits = {}
    for name, over in {"plain": [], "qk_norm": ["model.qk_norm=true"], "cap": ["model.logit_softcap=5"]}.items():
        model = vit(*over)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(30)
        model(x)
        logits[name] = max(float(p) for p in model.probes().values())
    assert set(vit().probes()) == {"attn/logit_max/0", "attn/logit_max/1"}
    assert logits["plain"] > 100 and logits["qk_norm"] <= 8 ** 0.5 + 1e-4
    attn, h = vit("model.logit_softcap=5").blocks[0].attn, torch.randn(2, 16, 16)
    q, k, v = attn.qkv(h).view(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    raw = q @ k.transpose(-2, -1) / 8 ** 0.5
    want = attn.proj(((5 * torch.tanh(raw / 5)).softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 16))
    torch.testing.assert_close(attn(h), want)
    assert float(attn.logit_max) == pytest.approx(float(raw.max()), rel=1e-6)  # recorded before the cap
