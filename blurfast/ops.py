"""The public ops: dct2, idct2, spectral (the fused frequency-space op), gaussian_blur.

Three layers, as in flash-attention: ``torch.library`` custom ops (``blurfast::*``, with
fake and autograd registrations) call the kernels through raw pointers; an
``autograd.Function`` per op (forward the custom op, backward and jvp the same formulas)
serves torch.func's transforms and forward-mode AD, which the custom ops' generated
Functions cannot; the plain functions at the bottom validate arguments and are what users
call. They call the custom op directly unless a transform or forward AD is active.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from .checks import check_bool, check_int
from ._backend import _C, DTYPE_CODES, HAS_CUDA_KERNELS, check_cuda_device
from .schedules import blur_eigenvalues_2d

__all__ = ["dct2", "idct2", "spectral", "gaussian_blur", "normal_like"]

_SEED_LIMIT = 2 ** 63


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _planes(x: Tensor) -> int:
    h, w = x.shape[-2:]
    return x.numel() // (h * w) if h * w else 0


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------- kernel calls (real tensors)

def _on_device_of_x(run):
    """A kernel call run with its tensor's CUDA device current (the kernels allocate nothing
    and use the current device's stream). torch's guard restores the caller's device without
    creating a CUDA context there, which a switch inside the extension could not promise."""
    @functools.wraps(run)
    def call(x, *args):
        if x.device.type == "cuda":
            check_cuda_device(x.device.index)
            if torch.cuda.current_device() != x.device.index:
                with torch.cuda.device(x.device):
                    return run(x, *args)
        return run(x, *args)
    return call


@_on_device_of_x
def _run_dct2(x: Tensor, inverse: bool) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    h, w = x.shape[-2:]
    if x.device.type == "cpu":
        if x.dtype in (torch.float16, torch.bfloat16):   # float32 arithmetic
            return _run_dct2(x.float(), inverse).to(x.dtype)
        _C.dct2_cpu(x.data_ptr(), out.data_ptr(), _planes(x), h, w, DTYPE_CODES[x.dtype],
                    inverse, torch.get_num_threads())
    else:
        ws = torch.empty(_C.dct2_workspace_elems(x.data_ptr(), out.data_ptr(), _planes(x), h, w,
                                                 DTYPE_CODES[x.dtype], x.device.index),
                         dtype=_compute_dtype(x.dtype), device=x.device)
        _C.dct2_cuda(x.data_ptr(), out.data_ptr(), ws.data_ptr(), _planes(x), h, w,
                     DTYPE_CODES[x.dtype], inverse, x.device.index, _stream(x.device))
    return out


def _map_arg(m: Optional[Tensor], x: Tensor, ct: torch.dtype):
    """A map broadcastable to x as (tensor (mod, H, W), (ptr, div, mod)).

    Data plane p uses map plane (p // div) % mod: this covers maps whose non-broadcast
    leading dims form one block (e.g. (B,1,H,W), (1,C,H,W), (H,W)); any other
    broadcasting is materialized.
    """
    if m is None:
        return None, None
    h, w = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    m = m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape))
    varying = [i for i in range(len(lead)) if m.shape[i] != 1]
    if varying and any(m.shape[i] != lead[i] for i in range(varying[0], varying[-1] + 1)):
        m = m.expand(lead + tuple(m.shape[-2:]))
        varying = list(range(len(lead)))
    mod = div = 1
    if varying:
        for i in range(varying[0], varying[-1] + 1):
            mod *= lead[i]
        for i in range(varying[-1] + 1, len(lead)):
            div *= lead[i]
    t = m.expand(tuple(m.shape[:-2]) + (h, w)).to(ct).contiguous().reshape(mod, h, w)
    return t, (t.data_ptr(), div, mod)


def spectral_kernel_args(x, a, x2, a2, g, noise, seed, offset, out, noise_out):
    """The raw-pointer argument tuple of ``_C.spectral_*`` and the tensors it points into
    (keep them alive until the kernel has run)."""
    ct = _compute_dtype(x.dtype)
    x = x.contiguous()
    x2 = None if x2 is None else x2.contiguous()
    keep = [x, x2]
    refs = []
    for m in (a, a2, g):
        t, ref = _map_arg(m, x, ct)
        keep.append(t)
        refs.append(ref)
    zb = None if noise is None else noise.to(ct).expand(x.shape).contiguous()
    keep.append(zb)
    h, w = x.shape[-2:]
    args = (_planes(x), h, w, DTYPE_CODES[x.dtype], x.data_ptr(),
            0 if x2 is None else x2.data_ptr(), refs[0], refs[1], refs[2],
            0 if zb is None else zb.data_ptr(), seed, offset, out.data_ptr(),
            0 if noise_out is None else noise_out.data_ptr())
    return args, keep


@_on_device_of_x
def _run_spectral(x, a, x2, a2, g, noise, seed, offset, return_noise):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    noise_px = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if return_noise
                else x.new_empty((0,)))
    if out.numel() == 0:
        return out, noise_px
    io_dtype = x.dtype
    if x.device.type == "cpu" and io_dtype in (torch.float16, torch.bfloat16):
        o, n = _run_spectral(x.float(), a, None if x2 is None else x2.float(), a2, g,
                             noise, seed, offset, return_noise)
        return o.to(io_dtype), n.to(io_dtype)
    args, keep = spectral_kernel_args(x, a, x2, a2, g, noise, seed, offset, out,
                                      noise_px if return_noise else None)
    ct = _compute_dtype(io_dtype)
    if x.device.type == "cpu":
        _C.spectral_cpu(*args, torch.get_num_threads())
    else:
        ws = torch.empty(_C.spectral_workspace_elems(*args, x.device.index), dtype=ct,
                         device=x.device)
        _C.spectral_cuda(*args, ws.data_ptr(), x.device.index, _stream(x.device))
    return out, noise_px


@_on_device_of_x
def _run_normal(x: Tensor, seed: int, offset: int) -> Tensor:
    ct = _compute_dtype(x.dtype)
    out = torch.empty(x.shape, dtype=ct, device=x.device)
    if out.numel():
        if x.device.type == "cpu":
            _C.normal_cpu(out.data_ptr(), out.numel(), DTYPE_CODES[ct], seed, offset)
        else:
            _C.normal_cuda(out.data_ptr(), out.numel(), DTYPE_CODES[ct], seed, offset,
                           x.device.index, _stream(x.device))
    return out.to(x.dtype)


# ---------------------------------------------------------------- custom ops

def _check_dtype(name: str, t: Tensor) -> None:
    """TypeError naming ``name`` unless ``t`` has a dtype the kernels take (DTYPE_CODES);
    the ops called directly reached DTYPE_CODES[t.dtype], a KeyError, first."""
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: expected dtype {_DTYPE_NAMES}, got {t.dtype}")


def _check_op_tensors(x, a, x2, a2, g, noise) -> None:
    """What the spectral kernel trusts of a direct call of ``torch.ops.blurfast.spectral``
    (which :func:`spectral` checks in full, naming each argument): a map or noise that is
    not floating-point is refused as spectral() refuses it (the kernel converted it); an x2
    without a2 (or the reverse), an x2 of another shape or dtype, or a tensor on another
    device would have it read through a null or foreign pointer, or past the end of a
    buffer; a map or noise of more dims than x, whose leading sizes happen to multiply to
    x's, would be read as x's shape instead of broadcasting (other shapes fail in
    _map_arg's expand)."""
    _check_dtype("x", x)
    if (x2 is None) != (a2 is None):
        raise ValueError("x2, a2: give both or neither")
    if x2 is not None and (x2.shape != x.shape or x2.dtype != x.dtype):
        raise ValueError(f"x2: expected x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(x2.shape)} and {x2.dtype}")
    for name, t in (("a", a), ("a2", a2), ("g", g), ("noise", noise)):
        if t is not None:
            _check_map_dtype(name, t)
    for name, t in (("a", a), ("x2", x2), ("a2", a2), ("g", g), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")
        if t is not None and t.dim() > x.dim():
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to x's shape "
                             f"{tuple(x.shape)}")


@torch.library.custom_op("blurfast::dct2", mutates_args=())
def _dct2_op(x: Tensor) -> Tensor:
    _check_dtype("x", x)
    return _run_dct2(x, False)


@torch.library.custom_op("blurfast::idct2", mutates_args=())
def _idct2_op(x: Tensor) -> Tensor:
    _check_dtype("x", x)
    return _run_dct2(x, True)


@torch.library.custom_op("blurfast::spectral", mutates_args=())
def _spectral_op(x: Tensor, a: Tensor, x2: Optional[Tensor], a2: Optional[Tensor],
                 g: Optional[Tensor], noise: Optional[Tensor], seed: int, offset: int,
                 return_noise: bool) -> tuple[Tensor, Tensor]:
    _check_op_tensors(x, a, x2, a2, g, noise)
    return _run_spectral(x, a, x2, a2, g, noise, seed, offset, return_noise)


@torch.library.custom_op("blurfast::normal_like", mutates_args=())
def _normal_op(x: Tensor, seed: int, offset: int) -> Tensor:
    _check_dtype("x", x)
    return _run_normal(x, seed, offset)


@_dct2_op.register_fake
def _(x):
    _check_dtype("x", x)
    return x.new_empty(x.shape)


@_idct2_op.register_fake
def _(x):
    _check_dtype("x", x)
    return x.new_empty(x.shape)


@_spectral_op.register_fake
def _(x, a, x2, a2, g, noise, seed, offset, return_noise):
    _check_op_tensors(x, a, x2, a2, g, noise)
    return x.new_empty(x.shape), x.new_empty(x.shape if return_noise else (0,))


@_normal_op.register_fake
def _(x, seed, offset):
    _check_dtype("x", x)
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- calls torch.func can transform

# torch.func's transforms (grad, vjp, jacrev, jacfwd, jvp, vmap) refuse the autograd.Function
# that register_autograd generates, for want of a setup_context staticmethod (pytorch/pytorch
# issues 168393 and 179652): "In order to use an autograd.Function with functorch transforms
# ... it must override the setup_context staticmethod". So under a transform, and under
# forward-mode AD (which the custom ops lack), each op is called through its autograd.Function
# below (_DCT2, _IDCT2, _Spectral, _NormalLike); elsewhere through the custom op itself, as
# before. The gradient formulas, registered on the custom ops and called by the Functions
# alike, call the ops through these functions too, so that a backward can itself be
# transformed (hessians, gradients of per-sample gradients). The test costs 0.06 µs; a
# Function's apply about 8 µs more than the custom op's call (28 µs for spectral, whose nine
# arguments apply binds to forward's signature): measured on a 1 x 1 x 8 x 8 float32 tensor.

def _through_function() -> bool:
    """Whether an op call must go through its autograd.Function: a torch.func transform is
    active (the one condition under which autograd.Function.apply needs setup_context), or a
    forward-AD level is open (dual tensors exist only inside one)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _dct2_call(x: Tensor) -> Tensor:
    return _DCT2.apply(x) if _through_function() else _dct2_op(x)


def _idct2_call(x: Tensor) -> Tensor:
    return _IDCT2.apply(x) if _through_function() else _idct2_op(x)


def _spectral_call(x, a, x2, a2, g, noise, seed, offset, return_noise):
    f = _Spectral.apply if _through_function() else _spectral_op
    return f(x, a, x2, a2, g, noise, seed, offset, return_noise)


def _normal_call(x: Tensor, seed: int, offset: int) -> Tensor:
    return _NormalLike.apply(x, seed, offset) if _through_function() else _normal_op(x, seed, offset)


# ---------------------------------------------------------------- gradient formulas

# The transforms are orthonormal: the adjoint of dct2 is idct2 and vice versa.
def _dct2_backward(ctx, grad):
    return _idct2_call(grad)


def _idct2_backward(ctx, grad):
    return _dct2_call(grad)


# The noise depends on x's shape only, not its values (the backward of spectral calls this
# on its saved x, which requires grad under create_graph).
def _normal_backward(ctx, grad):
    return None, None, None


_dct2_op.register_autograd(_dct2_backward)
_idct2_op.register_autograd(_idct2_backward)
_normal_op.register_autograd(_normal_backward)


def _spectral_setup(ctx, inputs, output):
    x, a, x2, a2, g, noise, seed, offset, return_noise = inputs
    ctx.save_for_backward(x, a, x2, a2, g, noise)
    ctx.seed, ctx.offset = seed, offset


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Sums a broadcast gradient back to the shape of ``like``."""
    lead = t.dim() - like.dim()
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(like.shape) if n == 1 and t.shape[i] != 1)
    return (t.sum(dim=dims, keepdim=True) if dims else t).to(like.dtype)


def _spectral_backward(ctx, grad_out, grad_noise):
    # out = idct2(Z), Z = a*X + a2*X2 + g*zb, X = dct2(x): every map is self-adjoint.
    x, a, x2, a2, g, noise = ctx.saved_tensors
    need = ctx.needs_input_grad
    # gz, the output gradient in frequency space, only for the maps' and noise's gradients
    gz = _dct2_call(grad_out) if any(need[i] for i in (1, 3, 4, 5)) else None
    grad = [None] * 9
    if need[0]:
        grad[0] = _spectral_call(grad_out, a, None, None, None, None, 0, 0, False)[0]
    if need[1]:
        grad[1] = _reduce_to(gz * _dct2_call(x), a)
    if x2 is not None and need[2]:
        grad[2] = _spectral_call(grad_out, a2, None, None, None, None, 0, 0, False)[0]
    if x2 is not None and need[3]:
        grad[3] = _reduce_to(gz * _dct2_call(x2), a2)
    if g is not None and need[4]:
        zb = noise if noise is not None else _normal_call(x, ctx.seed, ctx.offset)
        grad[4] = _reduce_to(gz * zb, g)
    if noise is not None and need[5]:
        gn = (gz * g) if g is not None else torch.zeros_like(gz)
        if grad_noise is not None and grad_noise.numel():
            gn = gn + _dct2_call(grad_noise)
        grad[5] = _reduce_to(gn, noise)
    return tuple(grad)


_spectral_op.register_autograd(_spectral_backward, setup_context=_spectral_setup)


def _spectral_jvp(ctx, tx, ta, tx2, ta2, tg, tnoise, *_):
    """Forward mode: out = idct2(a*dct2(x) + a2*dct2(x2) + g*zb) is linear in each of x, a,
    x2, a2, g and zb, so its tangent is the sum over the inputs with a tangent of the same
    expression with that input replaced by its tangent (idct2(ta*dct2(x)) is spectral(x, ta)),
    in fused calls of two data terms and one noise term each. Made noise has no tangent."""
    x, a, x2, a2, g, noise = ctx.saved_tensors
    data = [(d, m) for d, m in ((tx, a), (x, ta), (tx2, a2), (x2, ta2))
            if d is not None and m is not None]
    noisy = []                  # (map, noise); noise None: made from (seed, offset) as in forward
    if g is not None and tg is not None:
        noisy.append((tg, noise))
    if g is not None and tnoise is not None:
        noisy.append((g, tnoise))
    t_out = None
    while data or noisy:
        d1, m1 = data.pop(0) if data else (x, torch.zeros((), dtype=x.dtype, device=x.device))
        d2, m2 = data.pop(0) if data else (None, None)
        gm, zb = noisy.pop(0) if noisy else (None, None)
        term = _spectral_call(d1, m1, d2, m2, gm, zb, ctx.seed, ctx.offset, False)[0]
        t_out = term if t_out is None else t_out + term
    if t_out is None:
        t_out = torch.zeros_like(x)
    if ctx.return_noise and noise is not None and tnoise is not None:
        # idct2(zb) in the compute dtype, rounded once to x's (as the kernel does)
        t_noise = _idct2_call(tnoise.to(_compute_dtype(x.dtype)).expand(x.shape)).to(x.dtype)
    else:       # made noise, or the empty second output of return_noise=False
        t_noise = x.new_zeros(x.shape if ctx.return_noise else (0,))
    return t_out, t_noise


def _sample_shape(t: Tensor, bdim: Optional[int]) -> tuple:
    """The logical (per-sample) shape of an unwrapped tensor whose vmap dim is ``bdim``."""
    return tuple(t.shape) if bdim is None else tuple(t.movedim(bdim, 0).shape[1:])


def _spectral_vmap(info, in_dims, x, a, x2, a2, g, noise, seed, offset, return_noise):
    """vmap's rule for spectral: one call of the op on the whole batch.

    x and x2 become (V, *sample) (an unbatched one expanded when anything else is batched);
    a batched map or noise becomes (V, 1, ..., 1, *its logical shape), padded to x's logical
    rank so that it broadcasts from the right as in a single-sample call, and an unbatched one
    broadcasts as it is. Noise the kernel would make from (seed, offset) is made once for one
    sample's shape, in the compute dtype (the kernel's own noise, to the bit: normal_like),
    and passed as given noise, unbatched: every sample takes stream positions offset + i of
    its own flat index i, as a loop of single-sample calls draws. The call goes through
    _spectral_call, so transforms outside this vmap (grad(vmap(f)), nested vmaps) see it.
    """
    v = info.batch_size
    xd, ad, x2d, a2d, gd, nd = in_dims[:6]
    sample = _sample_shape(x, xd)          # x2's too
    n = len(sample)

    def data(t, d):
        if t is None:
            return None
        return t.expand((v,) + tuple(t.shape)) if d is None else t.movedim(d, 0)

    def freq(t, d):
        if t is None or d is None:
            return t
        t = t.movedim(d, 0)
        return t.reshape((v,) + (1,) * (n + 1 - t.dim()) + tuple(t.shape[1:]))

    if noise is None and (g is not None or return_noise):
        ct = _compute_dtype(x.dtype)
        noise = _normal_call(torch.empty(sample, dtype=ct, device=x.device), seed, offset)
        nd = None
    out, noise_px = _spectral_call(data(x, xd), freq(a, ad), data(x2, x2d), freq(a2, a2d),
                                   freq(g, gd), freq(noise, nd), seed, offset, return_noise)
    return (out, noise_px), (0, 0 if return_noise else None)


def _normal_vmap(info, in_dims, x, seed, offset):
    """vmap's rule for normal_like: the stream depends on x's shape alone, so it is one
    sample's, unbatched (out_dim None: vmap expands it), as each single-sample call makes."""
    d = in_dims[0]
    if info.batch_size == 0:        # no sample to take the shape of: an empty batch
        return _normal_call(x.movedim(d, 0), seed, offset), 0
    return _normal_call(x.select(d, 0), seed, offset), None


# ---------------------------------------------------------------- autograd.Functions

# The layer between the custom ops and the public functions that torch.func can transform:
# forward calls the custom op, setup_context, backward and jvp the formulas above (one
# source of truth for each). Each has a vmap staticmethod that makes one call for the whole
# batch (torch's generated rule, generate_vmap_rule, would run the custom op once per sample
# through its fallback, with a performance warning each time): dct2 and idct2 move vmap's
# dim in front (they transform every leading dim alike), spectral moves every batched
# argument's (_spectral_vmap), and normal_like returns one sample's stream. Every sample
# gets the noise a single-sample call makes, so that vmap(f)(xs)[k] is f(xs[k]) to the bit,
# as in a loop of single-sample calls.

def _transform_function(name: str, op, backward, call):
    """The autograd.Function of dct2 or idct2 (``op``, the custom op): linear, so its jvp is
    the transform of the tangent (``call``), and its vmap one call with vmap's dim in front."""

    class Transform(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return op(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return backward(ctx, grad)

        @staticmethod
        def jvp(ctx, tx):
            return call(tx)

        @staticmethod
        def vmap(info, in_dims, x):
            return call(x.movedim(in_dims[0], 0)), 0

    Transform.__name__ = Transform.__qualname__ = name
    return Transform


# (the ops looked up at each call, as the other Functions do: a test counts their calls)
_DCT2 = _transform_function("_DCT2", lambda x: _dct2_op(x), _dct2_backward, _dct2_call)
_IDCT2 = _transform_function("_IDCT2", lambda x: _idct2_op(x), _idct2_backward, _idct2_call)


class _Spectral(torch.autograd.Function):
    @staticmethod
    def forward(x, a, x2, a2, g, noise, seed, offset, return_noise):
        return _spectral_op(x, a, x2, a2, g, noise, seed, offset, return_noise)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _spectral_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:6])
        ctx.return_noise = inputs[8]

    @staticmethod
    def backward(ctx, grad_out, grad_noise):
        return _spectral_backward(ctx, grad_out, grad_noise)

    @staticmethod
    def jvp(ctx, *tangents):
        return _spectral_jvp(ctx, *tangents)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _spectral_vmap(info, in_dims, *args)


class _NormalLike(torch.autograd.Function):
    @staticmethod
    def forward(x, seed, offset):
        return _normal_op(x, seed, offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _normal_backward(ctx, grad)

    @staticmethod
    def jvp(ctx, tx, *_):
        return torch.zeros_like(tx)

    @staticmethod
    def vmap(info, in_dims, x, seed, offset):
        return _normal_vmap(info, in_dims, x, seed, offset)


# ---------------------------------------------------------------- validation and public API

_DTYPE_NAMES = "float32, float64, float16 or bfloat16"


def _check_data(name: str, t, min_dim: int = 2) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_dtype(name, t)
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims (..., H, W), got shape "
                         f"{tuple(t.shape)}")
    if t.device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise ValueError(f"{name}: is a CUDA tensor, but this blurfast was built without CUDA "
                         "kernels (reinstall with BLURFAST_CUDA=1 where nvcc is available)")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")


def _check_map_dtype(name: str, m: Tensor) -> None:
    """TypeError naming ``name`` unless the map (or noise) ``m`` is floating-point (the
    kernel would convert an integer or bool one to its compute dtype without a word)."""
    if not m.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point map, got {m.dtype}")


def _check_map(name: str, m, x: Tensor) -> None:
    if not isinstance(m, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(m).__name__}")
    _check_map_dtype(name, m)
    if m.device != x.device:
        raise ValueError(f"{name}: is on {m.device} but x is on {x.device}")
    # Broadcasts to x's shape: no more dims, and each trailing dim 1 or x's. (Plain Python:
    # torch.broadcast_shapes costs about 40 µs a call, more than a small CPU transform.)
    ok = m.dim() <= x.dim() and all(
        d == 1 or d == e for d, e in zip(reversed(m.shape), reversed(x.shape)))
    if not ok:
        raise ValueError(f"{name}: shape {tuple(m.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}")


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims (``scipy.fft.dctn(norm="ortho")``)."""
    _check_data("x", x)
    return _dct2_call(x)


def idct2(X: Tensor) -> Tensor:
    """Inverse of :func:`dct2` (orthonormal 2-D DCT-III) over the last two dims."""
    _check_data("X", X)
    return _idct2_call(X)


def spectral(x: Tensor, a: Tensor, x2: Optional[Tensor] = None, a2: Optional[Tensor] = None,
             g: Optional[Tensor] = None, noise: Optional[Tensor] = None, *,
             seed: Optional[int] = None, offset: int = 0, return_noise: bool = False):
    """The fused frequency-space op: ``idct2(a*dct2(x) + a2*dct2(x2) + g*zb)``.

    ``a``, ``a2`` and ``g`` are frequency maps broadcastable to ``x`` (e.g. (B,1,H,W) or
    (H,W)); ``x2`` has the shape of ``x``. ``zb`` is ``noise`` (frequency space,
    broadcastable to ``x``) when given, else standard normals made in the kernel from
    ``(seed, offset)`` by Philox4x32-10: element ``i`` (flat index) of ``x`` takes stream
    position ``offset + i``, on CPU and CUDA alike. ``seed=None`` draws one from torch's
    global generator, once per call: inside a CUDA graph capture it would be replayed, so
    there it is refused (a given seed is replayed too: pass ``noise`` for fresh noise per
    replay). With ``return_noise=True`` returns ``(out, idct2(zb))``.
    """
    _check_data("x", x)
    _check_map("a", a, x)
    check_bool("return_noise", return_noise)      # bool() took 1, "no", np.bool_
    if (x2 is None) != (a2 is None):
        raise ValueError("x2, a2: give both or neither")
    if x2 is not None:
        _check_data("x2", x2)
        if x2.shape != x.shape or x2.device != x.device:
            raise ValueError(f"x2: expected shape {tuple(x.shape)} on {x.device}, got "
                             f"{tuple(x2.shape)} on {x2.device}")
        if x2.dtype != x.dtype:
            raise TypeError(f"x2: expected x's dtype {x.dtype}, got {x2.dtype}")
        _check_map("a2", a2, x)
    if g is not None:
        _check_map("g", g, x)
    if noise is not None:
        _check_map("noise", noise, x)
        if g is None and not return_noise:
            raise ValueError("noise: given but unused (pass g and/or return_noise=True)")
    generates = noise is None and (g is not None or return_noise)
    if seed is None and generates and x.device.type == "cuda" \
            and torch.cuda.is_current_stream_capturing():
        raise ValueError("seed: None inside a CUDA graph capture draws one seed now, which "
                         "every replay repeats (the same noise each time); pass noise "
                         "(e.g. torch.randn_like(x), which replays advance), or a seed")
    if seed is None:      # drawn only when noise is made: no host sync otherwise
        # in range by construction: unchecked, for torch.compile (a data-dependent value)
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if generates else 0
    else:
        seed = check_int("seed", seed, 0, _SEED_LIMIT - 1)
    offset = check_int("offset", offset, 0, _SEED_LIMIT - 1)
    out, noise_px = _spectral_call(x, a, x2, a2, g, noise, seed, offset, return_noise)
    return (out, noise_px) if return_noise else out


def normal_like(x: Tensor, seed: int, offset: int = 0) -> Tensor:
    """The in-kernel noise stream as a tensor shaped like ``x`` (element i: position offset+i)."""
    _check_data("x", x, min_dim=0)
    return _normal_call(x, check_int("seed", seed, 0, _SEED_LIMIT - 1),
                        check_int("offset", offset, 0, _SEED_LIMIT - 1))


@functools.lru_cache(maxsize=32)
def _blur_map(h: int, w: int, sigma, kind: str, device: torch.device, dtype: torch.dtype):
    # Kept on its device: a copy from the host in each call would wait for the GPU. Made
    # outside inference mode: an inference tensor cached by a first call under
    # torch.inference_mode() could not be saved for a later call's backward.
    with torch.inference_mode(False):
        return blur_eigenvalues_2d((h, w), sigma, kind).to(device=device, dtype=dtype)


def gaussian_blur(x: Tensor, sigma, kind: str = "discrete") -> Tensor:
    """Gaussian blur of the last two dims through the DCT.

    ``kind="discrete"`` equals ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect")``
    (truncate=4); ``sigma`` is a number or (sigma_h, sigma_w).
    """
    _check_data("x", x)
    pair = isinstance(sigma, (tuple, list))
    items = tuple(sigma) if pair else (sigma,)
    # numbers only: float() would take True, "2" and a tensor (values checked by the maps)
    if (pair and len(items) != 2) or any(isinstance(s, bool) or not isinstance(s, numbers.Real)
                                         for s in items):
        raise ValueError(f"sigma: expected a number or (sigma_h, sigma_w), got {sigma!r}")
    sig = tuple(float(s) for s in items) if pair else float(sigma)
    # an empty side (0) takes a map of side 1, which broadcasts to it (sigma, kind checked)
    h, w = (max(n, 1) for n in x.shape[-2:])
    # traced under torch.compile (Dynamo bypasses lru_cache, warning that it does)
    make = _blur_map.__wrapped__ if torch.compiler.is_compiling() else _blur_map
    d = make(h, w, sig, kind, x.device, _compute_dtype(x.dtype))
    return spectral(x, d, seed=0)
