"""The CUDA-only paths of training and sampling (bf16, CUDA graphs); skipped without a GPU."""
import json

import numpy as np
import pytest

from train_helpers import TINY, made_photos

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return made_photos(tmp_path_factory.mktemp("gpu") / "photos", 32, size=16)


@pytest.mark.parametrize("cuda_graphs, grad_accum", [(False, 1), (True, 1), (None, 1),
                                                     (True, 2)])
def test_train_on_cuda_bf16(photos, tmp_path, cuda_graphs, grad_accum):
    # None: train()'s defaults on one GPU, a CUDA graph of the compiled model (compiling
    # takes a while, so the other cases don't compile). grad_accum 2: both rounds in the
    # captured step.
    from blurfast import checkpoint, training
    r = training.train(data=str(photos), out=str(tmp_path / "run"), preset="small",
                       resolution=16, model=TINY, diffusion=dict(num_steps=40), batch_size=8,
                       steps=12, lr=1e-3, device="cuda", precision="bf16",
                       cuda_graphs=cuda_graphs, compile=None if cuda_graphs is None else False,
                       log_every=4, save_every=12, sample_every=12, grad_accum=grad_accum,
                       sample_steps=3, sample_count=4, progress=False)
    assert r["step"] == 12 and np.isfinite(r["loss"]) and r["skipped"] == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cuda_graphs"] is (cuda_graphs is not False)     # None: on with one GPU
    assert config["compile"] is (cuda_graphs is None)
    model, diff, _ = checkpoint.load_model(r["checkpoint"], device="cuda")
    assert next(model.parameters()).is_cuda


@pytest.mark.parametrize("target", ["eps", "std"])
def test_sample_cuda_graph_matches_eager(photos, tmp_path, monkeypatch, target):
    # std: the conversion to eps checks t on the host, so it must stay outside the graph.
    import torch
    from blurfast import training
    from blurfast.generate import generate
    from blurfast.models import UNet
    # lr 1e-2 and EMA decay 0: the sampled weights' output is far from zero (test_generate).
    r = training.train(data=str(photos), out=str(tmp_path / "run"), preset="small",
                       resolution=16, model=TINY, diffusion=dict(num_steps=40), batch_size=8,
                       steps=2, lr=1e-2, ema_decay=0.0, target=target, device="cuda",
                       save_every=2, sample_every=100, sample_steps=3, progress=False)
    kw = dict(n=6, steps=4, batch=3, seed=5, fmt="npz", device="cuda", precision="fp32",
              progress=False)
    generate(r["checkpoint"], out=tmp_path / "eager", **kw)
    generate(r["checkpoint"], out=tmp_path / "graph", cuda_graph=True, **kw)
    a = np.load(tmp_path / "eager" / "samples.npz")["images"].astype(int)
    b = np.load(tmp_path / "graph" / "samples.npz")["images"].astype(int)
    assert np.abs(a - b).max() <= 1          # the same computation, replayed
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: torch.zeros_like(x))
    generate(r["checkpoint"], out=tmp_path / "zero", **kw)
    z = np.load(tmp_path / "zero" / "samples.npz")["images"].astype(int)
    assert np.abs(a - z).mean() > 5          # the model's output is in the images


def test_graphed_model_under_autocast_outlives_the_callers_autocast_region():
    # A graph captured inside an autocast region must not read that region's cached bf16
    # weights: they are freed when the region ends. Fill the freed blocks with nan, then
    # replay in a new region.
    import torch
    from blurfast.generate import GraphedModel
    from blurfast.models import UNet
    b = torch.backends
    flags = b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    # train() in an earlier test turned autotuning on: eager and captured calls could then
    # pick different convolution algorithms. Off here, both run the same kernels.
    b.cudnn.benchmark = b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = UNet.from_preset("small", resolution=16, **TINY).cuda()
        for p in model.parameters():                  # the zero-initialized convs too
            torch.nn.init.normal_(p, std=0.05)
        x = torch.randn(3, 3, 16, 16, device="cuda")
        t = torch.tensor([5, 200, 900], device="cuda")
        net = GraphedModel(model)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(x, t).float()
            first = net(x, t).float()
        junk = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
                for p in model.parameters() for _ in range(2)]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            again = net(x, t).float()
        del junk
        assert torch.isfinite(again).all()
        tol = dict(rtol=0, atol=1e-2 * want.abs().max().item())   # the same kernels, replayed
        torch.testing.assert_close(first, want, **tol)
        torch.testing.assert_close(again, want, **tol)
        with torch.no_grad():                         # no autocast: a graph of its own
            plain = model(x, t)
            got = net(x, t)
        assert got.dtype == torch.float32 and len(net.graphs) == 2
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-4 * plain.abs().max().item())
    finally:
        b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cast_once_on_cuda_matches_autocast(cuda_graphs):
    # Bf16Weights on a GPU, eager and captured: the same losses and gradients as
    # autocast's casts (bit for bit on a CPU, tests/test_training.py; here the attention's
    # backward accumulates in an order of its own, so within bf16 rounding).
    import copy
    import torch
    from blurfast import training
    from blurfast.diffusion import BlurDiffusion
    from blurfast.models import UNet
    b = torch.backends
    flags = b.cudnn.benchmark, b.cudnn.deterministic
    b.cudnn.benchmark, b.cudnn.deterministic = False, True
    try:
        diff = BlurDiffusion(resolution=16)
        torch.manual_seed(0)
        model = UNet(resolution=16, **TINY)
        steps = [training.TrainStep(copy.deepcopy(model), diff, device="cuda", lr=1e-3,
                                    precision="bf16", cuda_graphs=cuda_graphs, cast_once=c)
                 for c in (False, True)]
        for k, x, flip, t in _warmup_and_replay_batches(2, diff.num_steps):
            for s in steps:
                torch.manual_seed(100 + k)          # a captured step's noise generator
                s(x, flip, t, 9, 4 * k)
        ref, new = steps
        assert new._bf16.copies[0].dtype == torch.bfloat16
        a, b_ = ref.read_stats(), new.read_stats()
        assert a["skipped_total"] == b_["skipped_total"] == 0
        assert b_["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b_["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
        ga = torch.cat([p.grad.flatten() for p in ref.params])
        gb = torch.cat([p.grad.flatten() for p in new.params])
        assert (ga - gb).norm() <= 2e-2 * ga.norm()     # the last step's gradients
    finally:
        b.cudnn.benchmark, b.cudnn.deterministic = flags


def _warmup_and_replay_batches(seed: int, num_steps: int):
    """``(k, x, flip, t)`` for the eager warm-up steps of a captured TrainStep and two
    replays: 4 uint8 16x16 images, flips, steps in [1, num_steps), from ``seed``."""
    import torch
    from blurfast import training
    g = torch.Generator().manual_seed(seed)
    for k in range(training._GRAPH_WARMUP + 2):
        x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        t = torch.randint(1, num_steps, (4,), generator=g)
        yield k, x, torch.tensor([True, False, False, k % 2 == 1]), t


def _ieee_and_deterministic(monkeypatch):
    """float32 matrix products and convolutions without TF32, cuDNN's algorithms fixed,
    for the test (so that two runs of one computation agree to rounding)."""
    import torch
    b = torch.backends
    for obj, name, value in ((b.cudnn, "allow_tf32", False), (b.cuda.matmul, "allow_tf32", False),
                             (b.cudnn, "benchmark", False), (b.cudnn, "deterministic", True)):
        monkeypatch.setattr(obj, name, value)


def test_grad_accum_in_a_captured_step_gives_the_one_round_gradient(monkeypatch):
    # Captured steps of 1 and 2 rounds, float32 (TF32 off), on the same batches: the same
    # gradient up to summation order (on a CPU, eagerly: 1.3e-6 of its norm after these 5
    # steps). The noise is fixed per image (a captured step draws it from torch's
    # generator, whose numbers depend on the call's size), so both see the same x_t and
    # target; adam_eps 1 keeps a rounding-level gradient from flipping an update's sign.
    import copy
    import torch
    from blurfast import training
    from blurfast.diffusion import BlurDiffusion
    from blurfast.models import UNet

    def fixed_noise(self, x0, t, noise_seed=0, noise_offset=0):
        return 0.8 * x0 + 0.01 * t[:, None, None, None], 0.5 * x0.flip(-1)
    monkeypatch.setattr(training.TrainStep, "noised", fixed_noise)
    _ieee_and_deterministic(monkeypatch)
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    steps = [training.TrainStep(copy.deepcopy(model), diff, device="cuda", lr=1e-3,
                                adam_eps=1.0, cuda_graphs=True, grad_accum=k) for k in (1, 2)]
    for k, x, flip, t in _warmup_and_replay_batches(4, diff.num_steps):
        for s in steps:
            s(x, flip, t)
    one, two = steps
    assert two._graph is not None                    # the last steps were replayed
    one_stats, two_stats = one.read_stats(), two.read_stats()
    assert two_stats["loss"] == pytest.approx(one_stats["loss"], rel=1e-5)
    ga = torch.cat([p.grad.flatten() for p in one.params])
    gb = torch.cat([p.grad.flatten() for p in two.params])
    assert (ga - gb).norm() <= 1e-4 * ga.norm()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_in_a_captured_step(monkeypatch, dropout):
    # Captured float32 steps (TF32 off, deterministic cuDNN) of the same model with and
    # without activation checkpointing, on the same batches and noise: the same gradients
    # (bit for bit on a CPU; here the recomputation may pick other kernels, so to 1e-5 of
    # the norm). With dropout, the recomputation must replay the masks that the captured
    # forward drew, which needs torch's random state inside the capture. Then one eager
    # step each: checkpointing keeps less memory at its peak, over what the model, its
    # EMA and Adam's moments hold.
    import copy
    import torch
    from blurfast import training
    from blurfast.diffusion import BlurDiffusion
    from blurfast.models import UNet
    _ieee_and_deterministic(monkeypatch)
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **{**TINY, "dropout": dropout})
    steps = []
    for on in (False, True):
        m = copy.deepcopy(model)
        m.activation_checkpointing = on
        steps.append(training.TrainStep(m, diff, device="cuda", lr=1e-3, adam_eps=1.0,
                                        cuda_graphs=True))
    for k, x, flip, t in _warmup_and_replay_batches(5, diff.num_steps):
        for s in steps:
            torch.manual_seed(200 + k)        # the captured step's noise and dropout masks
            s(x, flip, t)
    ref, new = steps
    assert new._graph is not None
    assert new.read_stats()["loss"] == pytest.approx(ref.read_stats()["loss"], rel=1e-5)
    ga = torch.cat([p.grad.flatten() for p in ref.params])
    gb = torch.cat([p.grad.flatten() for p in new.params])
    assert (ga - gb).norm() <= 1e-5 * ga.norm()

    held = {}
    for on in (False, True):
        torch.manual_seed(0)
        m = UNet.from_preset("small", resolution=32)
        m.activation_checkpointing = on
        s = training.TrainStep(m, BlurDiffusion(resolution=32), device="cuda")
        x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
        t = torch.randint(1, 1000, (16,))
        s(x, torch.zeros(16, dtype=torch.bool), t)      # Adam's moments exist from here
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        s(x, torch.zeros(16, dtype=torch.bool), t)
        torch.cuda.synchronize()
        held[on] = torch.cuda.max_memory_allocated() - base
        del s, m
    assert held[True] < 0.5 * held[False], held


def test_a_captured_step_all_reduces_its_gradients_inside_the_graph(monkeypatch):
    # The step of several processes under CUDA graphs (TrainStep's ddp="flat", which
    # cuda_graphs with ddp=True takes): here one NCCL process, so the all-reduce in the
    # graph sums one rank. Against the captured step without a process group, on the same
    # batches, noise and dropout masks, float32 (TF32 off, deterministic cuDNN): the same
    # gradients and weights, to rounding (the flat step adds each gradient into a zeroed
    # view, 0 + g = g). Several GPUs are not tested here: the machine has one.
    import copy
    import torch
    import torch.distributed as dist
    from blurfast import training
    from blurfast.diffusion import BlurDiffusion
    from blurfast.models import UNet
    from bfutil import free_port
    _ieee_and_deterministic(monkeypatch)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        diff = BlurDiffusion(resolution=16)
        torch.manual_seed(0)
        model = UNet(resolution=16, **{**TINY, "dropout": 0.1})
        steps = [training.TrainStep(copy.deepcopy(model), diff, device="cuda", lr=1e-3,
                                    adam_eps=1.0, cuda_graphs=True, ddp=ddp)
                 for ddp in (False, True)]
        for k, x, flip, t in _warmup_and_replay_batches(6, diff.num_steps):
            for s in steps:
                torch.manual_seed(300 + k)
                s(x, flip, t)
        ref, new = steps
        assert new._graph is not None and new._grad_flat is not None and new._ddp is None
        assert all(p.grad.data_ptr() >= new._grad_flat.data_ptr() for p in new.params)
        assert new.read_stats()["loss"] == pytest.approx(ref.read_stats()["loss"], rel=1e-6)
        ga = torch.cat([p.grad.flatten() for p in ref.params])
        gb = torch.cat([p.grad.flatten() for p in new.params])
        assert (ga - gb).norm() <= 1e-6 * ga.norm()
        for a, b in zip(ref.params, new.params):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
