"""pytest-benchmark case: the complete training step of paper64 at 64x64 (process,
forward, backward, gradient clipping, Adam, EMA), images/s at batch 16 and 64.

``baseline``: fp32 eager with torch's default backend flags (TF32 convolutions), the
process through the pure-PyTorch reference DCT (``blurfast.reference``), torch's default
(foreach) Adam and a per-parameter EMA loop, as the paper's code does;
``baseline_fp32``: the same in IEEE float32 throughout. The others are
:class:`blurfast.training.TrainStep` configurations with the flags ``train()`` sets
(NCHW, as training defaults to): ``bf16`` (autocast, eager), ``graphs`` (bf16 + one CUDA
graph per step) and ``fast`` (bf16 + torch.compile + CUDA graph: what
``blurfast train --compile --cuda-graphs`` runs). CUDA only; each round is one step,
timed with a synchronize::

    pytest benchmarks/test_bench_train_step.py --bench-rounds 30
"""
import pytest
import torch

from blurfast.bench_steps import backend_flags, reference_train_step
from blurfast.diffusion import BlurDiffusion
from blurfast.models import UNet
from blurfast.training import TrainStep

CONFIGS = ("baseline", "baseline_fp32", "bf16", "graphs", "fast")
FLAGS = {"baseline": "torch_default", "baseline_fp32": "torch_fp32"}   # the rest: blurfast's


@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("config", CONFIGS)
def test_train_step(benchmark, bench_device, bench_rounds, config, batch):
    if bench_device.type != "cuda":
        pytest.skip("the training-step benchmark runs paper64 on a GPU only")
    torch.manual_seed(0)
    model = UNet.from_preset("paper64", resolution=64, channels=3)
    diff = BlurDiffusion(resolution=64)
    x_u8 = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8).pin_memory()
    flip = torch.zeros(batch, dtype=torch.bool).pin_memory()
    t = torch.randint(1, diff.num_steps, (batch,)).pin_memory()
    with backend_flags(FLAGS.get(config, "blurfast")):
        _time_step(benchmark, bench_device, bench_rounds, config, batch, model, diff, x_u8,
                   flip, t)


def _time_step(benchmark, bench_device, bench_rounds, config, batch, model, diff, x_u8,
               flip, t):
    if config.startswith("baseline"):
        model = model.to(bench_device)
        x0 = (x_u8.to(bench_device).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
        run_step = reference_train_step(model, diff, batch, bench_device)

        def one():
            run_step(x0)
    else:
        stepper = TrainStep(model, diff, device=bench_device, precision="bf16",
                            channels_last=False, compile=config == "fast",
                            cuda_graphs=config in ("graphs", "fast"))

        def one():
            stepper(x_u8, flip, t, 1, 0)

    def target():
        one()
        torch.cuda.synchronize(bench_device)

    for _ in range(5):                     # compile, capture, cuDNN autotuning
        target()
    benchmark.group = f"train step paper64 64x64 batch {batch}"
    benchmark.extra_info.update({"config": config, "batch": batch,
                                 "device": torch.cuda.get_device_name(bench_device)})
    benchmark.pedantic(target, rounds=bench_rounds, warmup_rounds=2, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:                  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(batch / stats.stats.median, 1)
        benchmark.extra_info["ms_per_step"] = round(stats.stats.median * 1e3, 2)
