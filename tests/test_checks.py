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
