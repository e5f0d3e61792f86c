"""The emulator's own checks (csrc/emulate.cpp), on toy block programs with planted bugs.

_C.emulator_selfcheck runs a deliberately broken toy program, or its corrected version,
through the emulator's run_blocks and EmuCtx, the code that runs the real kernels. Each
test shows that a check catches its kind of bug and that the corrected program passes it,
so that switching a check off (NaN fill, reverse thread and block order, late async
copies, the pending copy check, the bounds and overlap checks) fails a test here. The toy
programs run 2 blocks of 8 threads; thread i of the grid handles input floats 4 i .. 4 i + 3
of the input 1 .. 64.
"""
import numpy as np
import pytest

from blurfast._backend import _C

BLOCKS, THREADS = 2, 8
INPUT = np.arange(1, BLOCKS * THREADS * 4 + 1, dtype=np.float32)


def run(program, fixed, reverse):
    return np.array(_C.emulator_selfcheck(program, fixed, reverse), dtype=np.float32)


def same_bits(a, b):
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_missing_barrier_changes_the_reverse_run():
    # Thread t reads slot t + 1 in the phase in which thread t + 1 overwrites it.
    assert not same_bits(run("missing_barrier", False, False), run("missing_barrier", False, True))
    # With a barrier between the reads and the writes: both orders shift left.
    want = np.roll(INPUT.reshape(BLOCKS, THREADS, 4), -1, axis=1).ravel()
    for reverse in (False, True):
        assert same_bits(run("missing_barrier", True, reverse), want)


def test_read_of_an_unwritten_slot_gives_nan():
    # The last block's last thread does not write its slot; the first block did, so only
    # a refill of shared memory per block makes the read NaN.
    for reverse in (False, True):
        out = run("unwritten_read", False, reverse)
        assert np.isnan(out[-4:]).all()
        assert same_bits(out[:-4], INPUT[:-4])
        assert same_bits(run("unwritten_read", True, reverse), INPUT)


def test_async_copy_read_before_its_wait_changes_the_reverse_run():
    assert not same_bits(run("async_read_before_wait", False, False),
                         run("async_read_before_wait", False, True))
    for reverse in (False, True):
        assert same_bits(run("async_read_before_wait", True, reverse), INPUT)


def test_async_copy_never_waited_for_throws():
    # Forward runs land copies at once, so only the reverse run can see one pending.
    with pytest.raises(RuntimeError, match="asynchronous copy was never waited for"):
        run("async_never_waited", False, True)
    for reverse in (False, True):
        assert same_bits(run("async_never_waited", True, reverse), INPUT)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("program,message", [("read_outside", "read outside every buffer"),
                                             ("write_input", "write to an input")])
def test_access_outside_the_call_buffers_throws(program, message, reverse):
    with pytest.raises(IndexError, match=message):
        run(program, False, reverse)
    assert same_bits(run(program, True, reverse), INPUT)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_write_where_two_outputs_overlap_throws(reverse):
    # out2 starts one chunk into out: each write to out2 lies whole in out, which is
    # writable, and in forward runs the output even comes out right.
    with pytest.raises(IndexError, match=r"write to out also writes out2 \(the buffers overlap\)"):
        run("outputs_overlap", False, reverse)
    assert same_bits(run("outputs_overlap", True, reverse), INPUT)


def test_unknown_program_is_refused():
    with pytest.raises(ValueError, match="emulator_selfcheck: program must be"):
        run("no_such_program", False, False)


def test_a_block_writing_another_blocks_output_changes_the_reverse_run():
    # Block 0 also writes block 1's output: in forward runs block 1 runs later and
    # overwrites it, so only running the blocks in reverse order too shows it.
    assert same_bits(run("write_other_block", False, False), INPUT)
    out = run("write_other_block", False, True)
    assert (out[THREADS * 4:] == 0).all() and same_bits(out[:THREADS * 4], INPUT[:THREADS * 4])
    for reverse in (False, True):
        assert same_bits(run("write_other_block", True, reverse), INPUT)
