import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blurfast as bf
from blurfast.models import (Attention, ResBlock, UNet, Upsample, timestep_embedding,
                             upgrade_config)

from bfutil import rel_err
from train_helpers import TINY, one_thread  # noqa: F401  (autouse fixture)


def test_paper64_has_the_papers_parameter_count():
    with torch.device("meta"):
        m = UNet.from_preset("paper64", resolution=64, channels=3)
    assert abs(m.num_parameters() - 121.1e6) / 121.1e6 < 0.02
    assert m.config["channel_mult"] == [1, 2, 3, 4] and m.config["num_res_blocks"] == 3
    assert sum(isinstance(x, torch.nn.Module) and x.__class__.__name__ == "Attention"
               for x in m.modules()) == 3 * 2 + 4 * 2 + 1   # 16x16, 8x8 (down and up), middle


def test_larger_configs_in_the_docs_keep_attention_at_16_and_8():
    # docs/training.md, "Larger images": one level per doubling keeps paper64's attention
    # blocks (16x16 and 8x8, down and up, and the middle) at 128 and 256; the table's
    # parameter counts are the model's.
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    rows = re.findall(r"^  \| (\d+) \| `--preset paper64(?: --channel-mult ([\d ]+))?` \| "
                      r"([\d.]+) M \|$", doc, re.M)
    assert [r[0] for r in rows] == ["64", "128", "256"]
    for res, mult, count in rows:
        mult = tuple(int(m) for m in mult.split()) if mult else (1, 2, 3, 4)
        with torch.device("meta"):
            m = UNet.from_preset("paper64", resolution=int(res), channel_mult=mult)
        assert round(m.num_parameters() / 1e6, 2) == float(count)
        sides = []
        for blk in m.modules():
            if blk.__class__.__name__ == "Attention":
                blk.register_forward_hook(lambda mod, args, out: sides.append(out.shape[-1]))
        with torch.device("meta"):
            m(torch.zeros(1, 3, int(res), int(res)), torch.zeros(1, dtype=torch.long))
        assert sorted(sides) == sorted([16] * 7 + [8] * 7 + [int(res) >> (len(mult) - 1)])


def _count_by_hand(resolution, channels, base_channels, channel_mult, num_res_blocks,
                   attention_resolutions, **_):
    """ADM's parameter count written out: weights and biases of each conv, linear and
    GroupNorm, the decoder's blocks taking each encoder output's channels as a skip."""
    E = 4 * base_channels

    def conv(a, b, k):
        return a * b * k * k + b

    def res(a, b):             # norm, conv, scale-shift Linear, norm, conv, 1x1 skip
        return 2 * a + conv(a, b, 3) + E * 2 * b + 2 * b + 2 * b + conv(b, b, 3) + \
            (conv(a, b, 1) if a != b else 0)

    def attn(c):               # norm, qkv, proj
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)
    n = conv(base_channels, E, 1) + conv(E, E, 1) + conv(channels, base_channels, 3)
    ch, side, skips = base_channels, resolution, [base_channels]
    for i, m in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            c = m * base_channels
            n += res(ch, c) + (attn(c) if side in attention_resolutions else 0)
            ch = c
            skips.append(ch)
        if i < len(channel_mult) - 1:
            n += conv(ch, ch, 3)
            side //= 2
            skips.append(ch)
    n += 2 * res(ch, ch) + attn(ch)
    for i, m in reversed(list(enumerate(channel_mult))):
        for _ in range(num_res_blocks + 1):
            c = m * base_channels
            n += res(ch + skips.pop(), c) + (attn(c) if side in attention_resolutions else 0)
            ch = c
        if i:
            n += conv(ch, ch, 3)
            side *= 2
    return n + 2 * ch + conv(ch, channels, 3)


@pytest.mark.parametrize("preset, resolution, channels, millions", [
    ("paper64", 64, 3, 121.06), ("small", 32, 3, 5.44), ("small", 64, 3, 5.59),
    ("paper64", 32, 1, None), ("small", 16, 2, None)])
def test_parameter_counts_are_the_hand_count_and_the_docs(preset, resolution, channels,
                                                         millions):
    # docs/training.md, section 2's table, and models.PRESETS' comment
    with torch.device("meta"):
        m = UNet.from_preset(preset, resolution=resolution, channels=channels)
    n = _count_by_hand(resolution, channels, **bf.models.PRESETS[preset])
    assert m.num_parameters() == n
    if millions is not None:
        assert round(n / 1e6, 2) == millions


def test_small_has_a_few_million_parameters():
    with torch.device("meta"):
        m = UNet.from_preset("small", resolution=32)
    assert 2e6 < m.num_parameters() < 10e6


def test_forward_shape_and_zero_output_at_init():
    m = UNet(resolution=16, channels=3, **TINY)
    x = torch.randn(2, 3, 16, 16)
    y = m(x, torch.tensor([1, 999]))
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0        # zero-initialized output conv: eps_theta = 0


def test_output_depends_on_t_and_x():
    torch.manual_seed(0)
    m = UNet(resolution=16, channels=1, **TINY)
    for p in m.parameters():                   # leave the zero init behind
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 16, 16)
    a = m(x, torch.tensor([10]))
    assert not torch.allclose(a, m(x, torch.tensor([500])))
    assert not torch.allclose(a, m(x + 0.1, torch.tensor([10])))


def test_freq_input_feeds_the_dct_of_x():
    torch.manual_seed(0)
    m = UNet(resolution=16, channels=3, freq_input=True, **TINY)
    assert m.input.weight.shape[1] == 6
    ref = UNet(resolution=16, channels=3, **TINY)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k != "input.weight"},
                        strict=False)
    # With the pixel half of the input conv equal and the DCT half zero, the two agree;
    # with the DCT half set, m equals ref fed through an input conv on dct2(x) too.
    for p in m.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ref.out.load_state_dict(m.out.state_dict())
    with torch.no_grad():
        ref.input.weight.copy_(m.input.weight[:, :3])
        w_dct = m.input.weight[:, 3:].clone()
        m.input.weight[:, 3:] = 0
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    torch.testing.assert_close(m(x, t), ref(x, t))
    with torch.no_grad():
        m.input.weight[:, 3:] = w_dct
    assert not torch.allclose(m(x, t), ref(x, t))
    # With the pixel half zero, m(x) is ref(dct2(x)): the extra channels are dct2(x_t).
    with torch.no_grad():
        m.input.weight[:, :3] = 0
        ref.input.weight.copy_(w_dct)
    torch.testing.assert_close(m(x, t), ref(bf.dct2(x), t))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = UNet(resolution=16, channels=3, **TINY)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    a = m(x, t)
    m = m.to(memory_format=torch.channels_last)
    b = m(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0, 3]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    w = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * w), torch.sin(3 * w)]))


def test_config_rebuilds_the_model():
    m = UNet.from_preset("small", resolution=32, channels=1, dropout=0.1)
    m2 = UNet(**m.config)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())


@pytest.mark.parametrize("dropout", [np.float32(0.25), np.float64(0.1), np.int64(0)])
def test_numpy_numbers_are_taken_as_python_floats(dropout):
    # np.float32(0.1) was refused ("expected a number in [0, 1)") where 0.1 is taken.
    import json
    m = UNet(**{**dict(resolution=16, **TINY), "dropout": dropout})
    assert type(m.config["dropout"]) is float and m.config["dropout"] == float(dropout)
    assert json.loads(json.dumps(m.config)) == m.config
    ps = {mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)}
    assert ps == {float(dropout)} and all(type(p) is float for p in ps)
    for bad in (np.float32(1.0), np.float64(-0.1), np.float64("nan"), np.bool_(False)):
        with pytest.raises(ValueError, match="^dropout: expected a finite number >= 0 and < 1"):
            UNet(**{**dict(resolution=16, **TINY), "dropout": bad})


@pytest.mark.parametrize("kwargs, name", [
    (dict(resolution=20, channel_mult=(1, 2, 2, 2)), "resolution"),
    (dict(base_channels=48), "base_channels"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_heads=3), "num_heads"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UNet(**{**dict(resolution=16, **TINY), **kwargs})


def test_bad_preset_and_overrides():
    with pytest.raises(ValueError, match="preset"):
        UNet.from_preset("huge")
    with pytest.raises(TypeError, match="overrides"):
        UNet.from_preset("small", resolution=32, widht=3)
    with pytest.raises(TypeError, match="freq_input"):
        UNet(resolution=16, freq_input=1, **TINY)
    m = UNet(resolution=16, **TINY)
    with pytest.raises(ValueError, match=r"^x: expected"):
        m(torch.zeros(1, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"^t: expected"):
        m(torch.zeros(2, 3, 16, 16), torch.tensor([1]))


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: m(x.long(), torch.tensor([1, 2])), TypeError,
     "x: expected a floating-point tensor, got torch.int64"),
    (lambda m, x: m([[0.0]], torch.tensor([1, 2])), TypeError,
     "x: expected a floating-point tensor, got list"),
    (lambda m, x: m(x, torch.tensor([1.0, 2.0])), TypeError,
     "t: expected an integer tensor or an int, got torch.float32"),
    (lambda m, x: m(x, torch.tensor([True, False])), TypeError, "t: expected an integer tensor"),
    (lambda m, x: m(x, 2.0), TypeError, "t: expected an integer tensor or an int, got float"),
    (lambda m, x: m(x, -1), ValueError, "t: expected an int >= 0, got -1"),
    (lambda m, x: m(x, True), ValueError, "t: expected an int >= 0, got True"),
    (lambda m, x: timestep_embedding(torch.tensor([1, 2]), -4), ValueError,
     "dim: expected an int >= 1, got -4"),
    (lambda m, x: timestep_embedding(torch.tensor([1, 2]), 8, 0.0), ValueError,
     "max_period: expected a finite number > 0"),
    (lambda m, x: timestep_embedding(3, 8), TypeError, "t: expected a real tensor of shape (B,)"),
    (lambda m, x: timestep_embedding(torch.tensor([[1]]), 8), TypeError,
     "t: expected a real tensor of shape (B,), got torch.int64 (1, 1)"),
])
def test_forward_names_bad_inputs(call, error, words):
    m = UNet(resolution=16, **TINY)
    with pytest.raises(error) as e:
        call(m, torch.zeros(2, 3, 16, 16))
    assert str(e.value).startswith(words), e.value


def test_an_int_t_is_the_step_of_the_whole_batch():
    torch.manual_seed(0)
    m = UNet(resolution=16, channels=1, **TINY)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(m(x, 7), m(x, torch.tensor([7, 7])), rtol=0, atol=0)


def test_forward_checks_trace_in_one_graph():
    # Dynamo (the front end of torch.compile; the eager back end keeps it quick) traces
    # the input checks without a graph break, with a tensor t and with an int t.
    torch.manual_seed(0)
    m = UNet(resolution=16, channels=1, **TINY)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 9])
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), m(x, t))
    torch.testing.assert_close(compiled(x, 5), m(x, 5))
    with pytest.raises(Exception, match="x: expected a floating-point tensor"):
        compiled(x.long(), t)       # fullgraph: dynamo's error, naming the TypeError


def test_resolution_rule_is_the_models():
    from blurfast.models import check_resolution
    assert check_resolution(24, (1, 2, 2, 2)) == 24
    with pytest.raises(ValueError, match=r"^--resolution: 20 is not divisible by 2\^3"):
        check_resolution(20, (1, 2, 2, 2), "--resolution")
    with pytest.raises(ValueError, match=r"^resolution: expected an int >= 1, got -1"):
        check_resolution(-1, (1, 2))


def test_attention_sides_the_model_never_has_are_named():
    # paper64's attention at 16 and 8 needs levels down to 8: at 256 with its 4 levels
    # (sides 256 .. 32) it would silently get none.
    with pytest.warns(UserWarning, match=r"attention_resolutions: \[16, 8\] match none"):
        UNet.from_preset("paper64", resolution=256)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_runs_on_the_fused_kernel(channels_last):
    # SDPA's fused kernels take only q, k, v with a dense last dimension; with other
    # strides it falls back to the unfused math (on a GPU, silently and slower). With
    # the flash kernel alone allowed, other strides raise. Its error against the float64
    # model is at most twice the float32 math's (measured 4.3e-8 and 3.5e-8, output 0.07).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    m = UNet.from_preset("small", resolution=16, channels=3)
    for p in m.parameters():                  # nonzero output projections
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        truth = copy.deepcopy(m).double()(x.double(), t)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            math_err = (m(x, t).double() - truth).abs().max()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash_err = (m(x, t).double() - truth).abs().max()
    assert flash_err <= 2 * math_err


# ------------------------------------------------- building blocks against float64 formulas
#
# Each block, in float64 with random weights (the zero-initialized output convs too, else
# they hide everything before them), against its formula written here with functional ops
# on the block's own weights. The two differ by float64 rounding only: measured rel_err
# <= 6e-16; the bound 1e-12 leaves a wide margin and is far below any structural change.

def _randomize(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64 m, every weight N(0, 1/fan_in), every bias and norm parameter N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return m


def _group_norm(x, weight, bias, groups=32, eps=1e-5):
    """GroupNorm written out: each group of channels standardized over (channels, H, W)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    xn = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return xn * weight[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("cin, cout", [(64, 32), (32, 32)])   # 1x1-conv and identity skips
def test_resblock_is_the_scale_shift_formula(cin, cout):
    # out = skip(x) + conv2(silu(GN2(h) * (1 + scale) + shift)), h = conv1(silu(GN1(x))),
    # (scale, shift) = the two halves of Linear(emb); dropout 0. Fails on GN2(h) * scale
    # (the 1 + dropped) and on a lost skip.
    blk = _randomize(ResBlock(cin, cout, emb_dim=16, dropout=0.0), seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cin, 5, 7, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = blk(x, emb)
        h = F.conv2d(F.silu(_group_norm(x, blk.norm1.weight, blk.norm1.bias)),
                     blk.conv1.weight, blk.conv1.bias, padding=1)
        e = emb @ blk.emb.weight.T + blk.emb.bias
        scale, shift = e[:, :cout, None, None], e[:, cout:, None, None]
        assert scale.abs().min() > 1e-3           # the (1 + scale) factor is exercised
        h = _group_norm(h, blk.norm2.weight, blk.norm2.bias) * (1 + scale) + shift
        h = F.conv2d(F.silu(h), blk.conv2.weight, blk.conv2.bias, padding=1)
        skip = x if cin == cout else F.conv2d(x, blk.skip.weight, blk.skip.bias)
        want = skip + h
    assert got.shape == (2, cout, 5, 7)
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("emb_act", [True, False])
def test_blocks_read_the_timestep_embedding_through_a_silu(emb_act):
    # ADM: each block's scale-shift Linear reads SiLU(time_embed(sinusoid(t))). emb_act=False
    # (the model of checkpoints saved before the option) reads time_embed(...) itself.
    model = _randomize(UNet(resolution=16, emb_act=emb_act, **TINY), seed=3)
    blocks = [lv.res for lv in [*model.down, *model.mid, *model.up] if hasattr(lv, "res")]
    seen = []
    hooks = [b.emb.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
             for b in blocks]
    t = torch.tensor([0, 7, 500])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    with torch.no_grad():
        model(x, t)
        e = model.time_embed(timestep_embedding(t, model.base_channels).double())
    for h in hooks:
        h.remove()
    want = F.silu(e) if emb_act else e
    assert len(seen) == len(blocks) and all(torch.equal(v, want) for v in seen)
    assert model.config["emb_act"] is emb_act


def test_upgrade_config_reads_a_config_without_emb_act_as_false():
    cfg = UNet(resolution=16, **TINY).config
    old = {k: v for k, v in cfg.items() if k != "emb_act"}
    assert upgrade_config(old) == {**old, "emb_act": False}
    assert upgrade_config(cfg) == cfg and cfg["emb_act"] is True
    assert upgrade_config(None) is None


def test_attention_is_softmax_of_q_k_over_sqrt_d_per_head():
    # x + proj(o), o the per-head softmax(q k^T / sqrt(d)) v over the H*W positions
    # (row-major), q, k, v channels [0, C), [C, 2C), [2C, 3C) of qkv(GN(x)), head n their
    # channels [n d, (n + 1) d). Written on the (y, x) indices, so each output is checked
    # at its own pixel; a random non-square input is symmetric under no reordering of the
    # pixels. Fails on SDPA's scale 1 for 1/sqrt(d), and on the positions of q, k, v
    # reversed (the outputs then land at the mirrored pixels).
    c, heads, hh, ww = 64, 4, 3, 5
    d = c // heads
    blk = _randomize(Attention(c, heads), seed=3)
    with torch.no_grad():
        blk.qkv.weight.mul_(2)                    # logits of std ~1.4: far from uniform
    x = torch.randn(2, c, hh, ww, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    with torch.no_grad():
        got = blk(x)
        qkv = F.conv2d(_group_norm(x, blk.norm.weight, blk.norm.bias), blk.qkv.weight,
                       blk.qkv.bias)
        o = torch.empty_like(x)
        for n in range(heads):
            q, k, v = (qkv[:, s * c + n * d: s * c + (n + 1) * d] for s in range(3))
            logits = torch.einsum("bdyx,bdYX->byxYX", q, k) / math.sqrt(d)
            a = torch.softmax(logits.reshape(2, hh, ww, hh * ww), -1).reshape(logits.shape)
            o[:, n * d:(n + 1) * d] = torch.einsum("byxYX,bdYX->bdyx", a, v)
        want = x + F.conv2d(o, blk.proj.weight, blk.proj.bias)
        assert logits.std() > 1 and a.amax() > 0.5      # attention far from uniform (1/15)
    assert rel_err(got, want) <= 1e-12


def test_upsample_is_nearest_2x_then_conv():
    # conv3x3(each pixel repeated into a 2x2 block). Fails on bilinear interpolation.
    blk = _randomize(Upsample(8), seed=5)
    x = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64)
    with torch.no_grad():
        got = blk(x)
        up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        want = F.conv2d(up, blk.conv.weight, blk.conv.bias, padding=1)
    assert got.shape == (2, 8, 6, 8)
    assert rel_err(got, want) <= 1e-12


def _saved_bytes(fn):
    """fn()'s result and the bytes of the distinct storages autograd keeps for its
    backward (each storage once, however many ops save a view of it)."""
    held = {}

    def pack(t):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(held.values())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_gives_the_same_gradients_from_fewer_saved_activations(dropout):
    # The same model with and without checkpointing: the output, the input's gradient and
    # every parameter's gradient bit for bit (a dropout's masks replayed in the
    # recomputation), while autograd keeps a fraction of the bytes between forward and
    # backward (measured 71.4 MB against 10.9 MB here, 6.5x).
    torch.manual_seed(0)
    m = UNet.from_preset("small", resolution=32, dropout=dropout)
    with torch.no_grad():         # off the zero init, so that every block has a gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, t = torch.randn(4, 3, 32, 32), torch.tensor([1, 5, 90, 900])
    got = {}
    for on in (False, True):
        m.activation_checkpointing = on
        m.zero_grad()
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)                          # the same dropout masks
        out, held = _saved_bytes(lambda: m(x, t))
        out.square().mean().backward()
        got[on] = out.detach(), x.grad, [p.grad for p in m.parameters()], held
    (o0, gx0, g0, held0), (o1, gx1, g1, held1) = got[False], got[True]
    assert torch.equal(o0, o1) and torch.equal(gx0, gx1)
    assert all(a is not None and torch.equal(a, b) for a, b in zip(g0, g1))
    assert held1 < held0 / 4, (held0, held1)


def test_activation_checkpointing_only_where_a_backward_will_run(monkeypatch):
    # Checkpointing recomputes in a backward: in eval mode (the EMA, sampling) and under
    # no_grad the forward runs as always. It is a setting of the module, not of its
    # config: UNet(**config) and the state dict do not carry it.
    from blurfast import models
    calls = []
    real = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = UNet(resolution=16, **TINY)
    levels = sum(isinstance(x, models._Level) for x in m.modules())
    assert m.activation_checkpointing is False
    m.activation_checkpointing = True
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        m(x, t)
    m.eval()(x, t)
    assert calls == []
    m.train()(x, t)
    assert len(calls) == levels
    assert UNet(**m.config).activation_checkpointing is False
    assert copy.deepcopy(m).activation_checkpointing is True
    assert set(m.state_dict()) == set(UNet(**m.config).state_dict())
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match=r"^activation_checkpointing: expected a bool"):
            m.activation_checkpointing = bad


def test_the_docs_memory_table_at_64_is_what_paper64_keeps():
    # docs/training.md, "Larger images": the 64 row of the table of bytes kept for the
    # backward per image (the 128 and 256 rows, counted the same way, take 40 s more).
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    off, on = map(int, re.search(r"^  \| 64 \| (\d+) MiB \| (\d+) MiB \|$", doc, re.M).groups())
    torch.manual_seed(0)
    m = UNet.from_preset("paper64", resolution=64)
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([10])
    for ckpt, want in ((False, off), (True, on)):
        m.activation_checkpointing = ckpt
        assert round(_saved_bytes(lambda: m(x, t))[1] / 2 ** 20) == want


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # vmap of SDPA
def test_activation_checkpointing_under_torch_func_grad():
    # torch.func.grad, vjp and jacrev refuse the saved-tensor hooks that checkpointing runs
    # on ("don't yet support saved tensor hooks"): under them the forward runs as always,
    # so that per-sample gradients (vmap of grad over functional_call) still work, the
    # same numbers as without checkpointing.
    torch.manual_seed(0)
    m = UNet(resolution=16, **TINY)
    with torch.no_grad():         # off the zero init, so that every block has a gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500])

    def loss(p, xi, ti):
        return torch.func.functional_call(m, p, (xi[None], ti[None])).square().mean()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    got = {}
    for on in (False, True):
        m.activation_checkpointing = on
        got[on] = per_sample(params, x, t)
    assert all(torch.equal(got[False][k], got[True][k]) for k in params)
    # The test of the hooks stays out of dynamo's way: one graph, checkpointing in it.
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), m(x, t), rtol=0, atol=0)
