"""blurfast.checks: the bounds of check_number, open or closed at each end as its
docstring says (a closed bound accepts the value equal to it, an open one refuses it)."""
import pytest

from blurfast.checks import check_number


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
