"""The CUDA-only paths of training and sampling (bf16, CUDA graphs); skipped without a GPU."""
import numpy as np
import pytest

from train_helpers import TINY, made_photos

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return made_photos(tmp_path_factory.mktemp("gpu") / "photos", 32, size=16)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_train_on_cuda_bf16(photos, tmp_path, cuda_graphs):
    from blurfast import checkpoint, training
    r = training.train(data=str(photos), out=str(tmp_path / "run"), preset="small",
                       resolution=16, model=TINY, diffusion=dict(num_steps=40), batch_size=8,
                       steps=12, lr=1e-3, device="cuda", precision="bf16",
                       cuda_graphs=cuda_graphs, log_every=4, save_every=12, sample_every=12,
                       sample_steps=3, sample_count=4, progress=False)
    assert r["step"] == 12 and np.isfinite(r["loss"]) and r["skipped"] == 0
    model, diff, _ = checkpoint.load_model(r["checkpoint"], device="cuda")
    assert next(model.parameters()).is_cuda


def test_sample_cuda_graph_matches_eager(photos, tmp_path):
    from blurfast import training
    from blurfast.generate import generate
    r = training.train(data=str(photos), out=str(tmp_path / "run"), preset="small",
                       resolution=16, model=TINY, diffusion=dict(num_steps=40), batch_size=8,
                       steps=2, device="cuda", save_every=2, sample_every=100, sample_steps=3,
                       progress=False)
    kw = dict(n=6, steps=4, batch=3, seed=5, fmt="npz", device="cuda", precision="fp32",
              progress=False)
    generate(r["checkpoint"], out=tmp_path / "eager", **kw)
    generate(r["checkpoint"], out=tmp_path / "graph", cuda_graph=True, **kw)
    a = np.load(tmp_path / "eager" / "samples.npz")["images"].astype(int)
    b = np.load(tmp_path / "graph" / "samples.npz")["images"].astype(int)
    assert np.abs(a - b).max() <= 1          # the same computation, replayed
