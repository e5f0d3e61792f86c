"""blurfast.checks: the bounds of check_number, open or closed at each end as its
docstring says (a closed bound accepts the value equal to it, an open one refuses it)."""
import json

import numpy as np
import pytest
import torch

from blurfast import ops
from blurfast.checks import check_bool, check_int, check_number, check_size, is_int
from blurfast.diffusion import BlurDiffusion
from blurfast.models import UNet
from blurfast.sampling import sample


@pytest.mark.parametrize("lo_open", [False, True])
@pytest.mark.parametrize("hi_open", [False, True])
def test_check_number_bounds_at_each_end(lo_open, hi_open):
    lo, hi = 0.25, 0.75
    call = lambda v: check_number("v", v, lo, lo_open=lo_open, hi=hi, hi_open=hi_open)
    for v in (0.5, lo + 2 ** -50, hi - 2 ** -50):          # strictly inside: always accepted
        assert call(v) == v
    for v, is_open, sign in ((lo, lo_open, ">"), (hi, hi_open, "<")):
        if is_open:
            with pytest.raises(ValueError, match=rf"^v: expected a finite number .*{sign} {v}"):
                call(v)
        else:
            assert call(v) == v
    for v in (lo - 2 ** -50, hi + 2 ** -50):                # strictly outside: always refused
        with pytest.raises(ValueError, match="^v: "):
            call(v)


def test_check_number_int_bounds_are_exact():
    # ints at the bound itself, compared exactly (no float rounding)
    assert check_number("n", 3, 3, hi=7) == 3 and check_number("n", 7, 3, hi=7) == 7
    with pytest.raises(ValueError, match="^n: expected a finite number > 3 and < 7"):
        check_number("n", 7, 3, lo_open=True, hi=7, hi_open=True)
    with pytest.raises(ValueError, match="^n: expected a finite number > 3 and < 7"):
        check_number("n", 3, 3, lo_open=True, hi=7, hi_open=True)
    # an int beyond float's range is compared exactly too (math.isfinite raised OverflowError)
    with pytest.raises(ValueError, match="^n: expected a finite number >= 0 and < 1, got 1000"):
        check_number("n", 10 ** 400, 0, hi=1, hi_open=True)
    assert check_number("n", 10 ** 400, 0) == 10 ** 400


def test_compile_problem_names_what_torch_compile_lacks(monkeypatch):
    # On CUDA Inductor writes Triton kernels: the triton package and compute capability
    # 7.0 are needed (a CPU needs neither). The GPU is a stand-in: no CUDA here.
    import importlib.util

    import torch

    from blurfast.checks import compile_problem
    gpu = torch.device("cuda", 0)
    assert compile_problem(torch.device("cpu")) is None
    real_find = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla P100")
    for triton, capability, want in (
            (True, (6, 0), "compute capability 7.0 or newer (Triton's minimum); Tesla P100 "
                           "is 6.0"),
            (False, (9, 0), "needs the triton package, which is not installed"),
            (True, (7, 0), None), (True, (9, 0), None)):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, t=triton: (object() if t else None)
                            if name == "triton" else real_find(name, *a))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        got = compile_problem(gpu)
        assert (got is None) if want is None else (want in got), got


def test_default_precision_is_bf16_where_the_gpu_has_it(monkeypatch):
    import torch

    from blurfast.checks import default_precision
    assert default_precision(torch.device("cpu")) == "fp32"
    for capability, want in (((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert default_precision(torch.device("cuda", 0)) == want


@pytest.mark.parametrize("np_int", [np.int64, np.int32, np.uint8, np.intp])
def test_numpy_integers_pass_where_ints_do_and_come_back_as_ints(np_int):
    v = np_int(7)
    for got in (check_int("n", v), check_size("size", v)[0], check_size("size", (v, v))[1]):
        assert got == 7 and type(got) is int
    with pytest.raises(ValueError, match=r"^n: expected an int in \[0, 5\], got np"):
        check_int("n", v, 0, 5)


def test_bools_python_and_numpy_are_no_ints_and_only_pythons_a_bool():
    for b in (True, np.bool_(True)):
        assert not is_int(b)
        with pytest.raises(ValueError, match="^n: expected an int"):
            check_int("n", b)
        with pytest.raises(ValueError, match="^size: expected an int >= 1"):
            check_size("size", (b, 4))
    assert check_bool("flag", True) is True
    for v in (np.bool_(True), 1):
        with pytest.raises(TypeError, match="^flag: expected a bool"):
            check_bool("flag", v)


def test_public_api_takes_numpy_integers_as_ints():
    # The same results from np.int64 arguments as from ints (they were refused by some
    # functions, taken by others), and configs that stay JSON.
    n = np.int64
    a = BlurDiffusion(resolution=16, num_steps=20)
    b = BlurDiffusion(resolution=n(16), channels=n(3), num_steps=n(20))
    assert a == b and json.loads(json.dumps(b.config)) == a.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(ops.spectral(x, torch.ones(16, 16), g=torch.ones(16, 16), seed=5,
                                    offset=3),
                       ops.spectral(x, torch.ones(16, 16), g=torch.ones(16, 16), seed=n(5),
                                    offset=n(3)))
    assert torch.equal(a.q_sample(x, 7, seed=1)[0], a.q_sample(x, n(7), seed=n(1))[0])
    kw = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(8,))
    torch.manual_seed(0)
    m = UNet(resolution=16, **kw)
    torch.manual_seed(0)
    m2 = UNet(resolution=n(16), **{**kw, "base_channels": n(32), "channel_mult": (n(1), n(2)),
                                    "attention_resolutions": (n(8),)})
    assert json.loads(json.dumps(m2.config)) == m.config
    with torch.no_grad():
        assert torch.equal(m(x, 7), m2(x, n(7)))
    assert torch.equal(sample(m, a, (2, 3, 16, 16), steps=3, seed=4, progress=False),
                       sample(m, a, (n(2), 3, 16, 16), steps=n(3), seed=n(4), progress=False))


def test_spectral_takes_a_python_bool_for_return_noise_only():
    # bool(return_noise) took anything: "no" returned the noise.
    x, a = torch.zeros(1, 8, 8), torch.ones(8, 8)
    out, eps = ops.spectral(x, a, g=a, seed=1, return_noise=True)
    assert torch.equal(out, eps)              # x = 0, a = g = 1: the output is the noise
    for v in (np.bool_(True), 1, "no"):
        with pytest.raises(TypeError, match="^return_noise: expected a bool"):
            ops.spectral(x, a, g=a, seed=1, return_noise=v)
