import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from blurfast import checkpoint as ckpt
from blurfast import cli_train, data as D, training
from blurfast.diffusion import BlurDiffusion
from blurfast.models import UNet

from bfutil import free_port
from train_helpers import CIFAR, CIFAR_SKIP, TINY, cifar_photos, made_photos, one_thread  # noqa: F401


# Settings of the short runs: 16x16 images, a 0.7 M-parameter U-Net.
KW = dict(resolution=16, batch_size=4, lr=1e-3, ema_decay=0.9, model=TINY, log_every=1,
          save_every=2, sample_every=1000, sample_count=4, sample_steps=2, progress=False,
          device="cpu")
KW_SEED = 0          # train()'s default seed: the initial weights come from it


@pytest.fixture(scope="module")
def made16(tmp_path_factory):
    d = tmp_path_factory.mktemp("made")
    D.prepare(made_photos(d / "src", 64), d / "made16.npy", resolution=16, workers=0,
              progress=False)
    return d / "made16.npy"


@pytest.fixture(scope="module")
def cifar16(tmp_path_factory):
    if not CIFAR.exists():
        pytest.skip(CIFAR_SKIP)
    d = tmp_path_factory.mktemp("cifar")
    D.prepare(cifar_photos(d / "src", 512), d / "cifar16.npy", resolution=16, workers=0,
              progress=False)
    return d / "cifar16.npy"


@pytest.fixture(scope="module")
def reference_run(made16, tmp_path_factory):
    """An uninterrupted 6-step run: the state that stopped-and-resumed runs must reach."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return training.train(data=str(made16), out=str(out), steps=6, **KW)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def _child(script: str, env_extra=None, **popen):
    # Run from tests/: from the repository root, `python -c` would import the source tree
    # (without the compiled _C of a non-editable install) instead of the installed package.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parent, **popen)


def _start_two_ranks(script: str) -> list:
    """``script`` started as ranks 0 and 1 of a two-process group (torchrun's environment
    variables): the two processes."""
    port = str(free_port())
    return [_child(script, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                            "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(2)]


def _two_gloo_ranks(script: str) -> list:
    """Runs ``script`` as ranks 0 and 1 of a two-process group; their outputs, once both
    have succeeded."""
    procs = _start_two_ranks(script)
    logs = []
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
        logs.append(log)
    return logs


# ------------------------------------------------------------------------ learning

@pytest.mark.parametrize("photos", ["cifar16", "made16"])
def test_loss_goes_down_on_photographs(photos, request, tmp_path):
    path = request.getfixturevalue(photos)
    diff = BlurDiffusion(resolution=16)
    x0 = D.to_float(torch.from_numpy(np.load(path)[-32:]))          # held-out order: fixed
    t = torch.linspace(1, 999, 32).long()

    def held_out_loss(model):
        with torch.no_grad():
            return diff.loss(model.eval(), x0, t=t, seed=1234).item()

    torch.manual_seed(0)
    before = held_out_loss(UNet.from_preset("small", resolution=16, **TINY))
    res = training.train(data=str(path), out=str(tmp_path / "run"), steps=60,
                         **{**KW, "batch_size": 16, "lr": 2e-3, "log_every": 10,
                            "save_every": 60})
    after = held_out_loss(res["model"])
    assert before > 0.9                      # eps_theta = 0 at init: loss = E[eps^2]
    assert after < 0.3 * before               # measured: 0.99 -> 0.09 (CIFAR), 0.11 (made)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "images", "loss"] and len(rows) == 7
    assert float(rows[-1].split(",")[2]) < float(rows[1].split(",")[2])
    assert (tmp_path / "run" / "samples" / "step_000000060.png").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["diffusion"]["blur_schedule"] == "quartic" and cfg["model"]["num_res_blocks"] == 1


def test_step_process_matches_blur_diffusion():
    diff = BlurDiffusion(resolution=16, num_steps=100, sigma_max=0.3)
    t = torch.tensor([1, 7, 50, 99])
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    for target, conv in (("eps", None), ("std", diff.eps_to_std), ("score", diff.eps_to_score)):
        step = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu",
                                  target=target)
        x_t, y = step.noised(x0, t, noise_seed=77, noise_offset=4096)
        want_x, eps = diff.q_sample(x0, t, seed=77, offset=4096)
        torch.testing.assert_close(x_t, want_x)
        torch.testing.assert_close(y, eps if conv is None else conv(eps, t))


# ------------------------------------------------------------------------ resume

def test_resume_is_bit_exact(made16, reference_run, tmp_path):
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=3, **KW)
    res = training.train(data=str(made16), out=str(out), steps=6, resume="auto", **KW)
    assert res["step"] == 6
    _same_weights(res["model"], reference_run["model"])
    _same_weights(res["ema"], reference_run["ema"])
    # keep=3: steps 2, 3 (the stop), 4 and 6 were saved; the three newest remain
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [6, 4, 3]
    rows = [dict(zip(training.LOG_FIELDS, r.split(",")))
            for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # elapsed_s goes on from the checkpoint's time: it never falls
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[3] >= elapsed[2], elapsed
    # the checkpoint's time, saved after the row (which is rounded to 0.1 s)
    assert ckpt.load(out / "checkpoints" / "step_000000006")["elapsed_s"] >= elapsed[-1] - 0.05


def test_a_resumed_runs_elapsed_time_goes_on_from_its_checkpoint(made16, tmp_path,
                                                                 monkeypatch):
    # A run stopped between log rows saves the time it had run; the resumed run's rows go
    # on from that time, not from the last row's (which would lose the steps between).
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=3, **KW)
    saved = ckpt.latest_valid(out / "checkpoints")
    assert saved["elapsed_s"] > 0
    real = ckpt.latest_valid
    monkeypatch.setattr(training.ckpt, "latest_valid",
                        lambda d: {**real(d), "elapsed_s": 1000.0})
    training.train(data=str(made16), out=str(out), steps=5, resume="auto", **KW)
    rows = [dict(zip(training.LOG_FIELDS, r.split(",")))
            for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[2]["elapsed_s"]) < 1000 <= float(rows[3]["elapsed_s"]) < 1100


def test_fp16_resume_is_bit_exact_with_its_loss_scale(made16, tmp_path, monkeypatch):
    # test_resume_is_bit_exact under precision="fp16" (float16 autocast on the CPU), the
    # scale doubling every 2 finite steps (_SCALE_GROWTH): stopped at step 3 (scale 2^17,
    # one finite step counted), the resumed run takes up the saved scale and count, so
    # its steps 4 and 5 scale as the uninterrupted run's and end on its weights.
    monkeypatch.setattr(training, "_SCALE_GROWTH", 2)
    kw = {**KW, "precision": "fp16"}
    ref = training.train(data=str(made16), out=str(tmp_path / "ref"), steps=5, **kw)
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=3, **kw)
    assert ckpt.load(out / "checkpoints" / "step_000000003")["loss_scale"].tolist() == \
        [2.0 ** 17, 1.0]
    res = training.train(data=str(made16), out=str(out), steps=5, resume="auto", **kw)
    _same_weights(res["model"], ref["model"])
    _same_weights(res["ema"], ref["ema"])
    scales = [ckpt.load(p)["loss_scale"].tolist()
              for d in (out, tmp_path / "ref") for s, p in ckpt.list_checkpoints(d / "checkpoints")
              if s == 5]
    assert scales == [[2.0 ** 18, 1.0]] * 2

def test_resume_with_another_batch_counts_images_and_reads_on_in_the_permutation(
        made16, tmp_path, monkeypatch):
    # A run resumed with another global batch: log.csv's images is the running count of
    # examples consumed (stored in the checkpoint; one saved before it was: step x its
    # global batch), and the examples read go on in the epoch's permutation from there,
    # none skipped or repeated.
    read = []

    class Recording(training.StepBatches):
        def __iter__(self):
            for batch in super().__iter__():
                read.append(batch)
                yield batch
    monkeypatch.setattr(training, "StepBatches", Recording)
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=2, **KW)            # batch 4
    d = out / "checkpoints" / "step_000000002"
    st = ckpt.load(d)
    assert st["images"] == 8
    # As a checkpoint saved before `images` was stored: the fallback, 2 x 4
    net, ema = UNet(**st["config"]["model"]), UNet(**st["config"]["model"])
    net.load_state_dict(st["model"])
    ema.load_state_dict(st["ema"])
    ckpt.save(out / "checkpoints", 2, net, ema,
              {"optimizer": st["optimizer"], "stats": st["stats"]}, st["config"])
    assert "images" not in ckpt.load(d)
    with pytest.warns(UserWarning, match="batch_size 4 -> 2"):
        training.train(data=str(made16), out=str(out), steps=4, resume="auto",
                       **{**KW, "batch_size": 2})
    assert ckpt.load(out / "checkpoints" / "step_000000004")["images"] == 12
    # the stored count, not step x the saved global batch (4 x 2 = 8)
    with pytest.warns(UserWarning, match="batch_size 2 -> 3"):
        training.train(data=str(made16), out=str(out), steps=5, resume="auto",
                       **{**KW, "batch_size": 3})
    rows = [dict(zip(training.LOG_FIELDS, r.split(",")))
            for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert [(int(r["step"]), int(r["images"])) for r in rows] == \
        [(1, 4), (2, 8), (3, 10), (4, 12), (5, 15)]
    assert [len(b) for b in read] == [4, 4, 2, 2, 3]
    # 15 of the 64 examples: the first 15 of epoch 0's permutation, in its order
    want = training.StepBatches(64, 15, 15, 0, seed=KW_SEED, start=0, stop=1).indices(0)
    assert [i for b in read for i in b] == want


def test_a_manifest_of_another_format_is_not_loaded(reference_run, tmp_path):
    # checkpoint.FORMAT = 1 is the only format this reader knows: a manifest saying
    # "format": 2 (files and hashes intact) is refused, and the search falls back.
    import shutil
    cks = tmp_path / "checkpoints"
    shutil.copytree(Path(reference_run["checkpoint"]).parent, cks)
    newest, older = cks / "step_000000006", cks / "step_000000004"
    m = json.loads((newest / "manifest.json").read_text())
    assert m["format"] == 1
    (newest / "manifest.json").write_text(json.dumps({**m, "format": 2}))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"manifest\.json is damaged or of an unknown format"):
        ckpt.verify(newest)
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        assert ckpt.latest_valid(cks)["path"] == str(older)


def test_list_checkpoints_takes_only_finished_step_folders(tmp_path):
    # A killed save's temporary folder (".tmp-step_<9 digits>-<pid>", as save() names it)
    # and folders whose names merely contain a step name are not checkpoints.
    for name in (".tmp-step_000000004-123", "step_000000002", "step_000000003.old",
                 "old_step_000000005", "step_00000006"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_000000007").write_text("a file, not a folder")
    assert ckpt.list_checkpoints(tmp_path) == [(2, tmp_path / "step_000000002")]


def test_keep_never_prunes_the_checkpoint_just_saved(made16, tmp_path):
    # keep=1; the run's only checkpoint (step 4) is damaged, so resume='auto' starts
    # afresh: the save at step 3 is the run's checkpoint, not the damaged step 4.
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=4, keep=1, **KW)
    f = out / "checkpoints" / "step_000000004" / "state.pt"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        res = training.train(data=str(made16), out=str(out), steps=3, keep=1, resume="auto",
                             **KW)
    assert Path(res["checkpoint"]).is_dir()
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    # A run resumed from an earlier step: the checkpoints of the part it left go, so
    # resume='auto' continues the new part.
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for s in (2, 4, 6):
        ckpt.save(tmp_path / "ck", s, net, ema, {}, {}, keep=3)
    ckpt.save(tmp_path / "ck", 3, net, ema, {}, {}, keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ck")] == [3, 2]
    assert ckpt.latest_valid(tmp_path / "ck")["step"] == 3


def test_resume_refuses_another_target(made16, reference_run, tmp_path):
    # The target is fixed by the checkpoint, as the model and the diffusion are.
    with pytest.raises(ValueError, match=r"^resume: target 'std' differs from the "
                                         r"checkpoint's 'eps' \("):
        training.train(data=str(made16), out=str(tmp_path / "fork"), steps=7, target="std",
                       resume=reference_run["checkpoint"], **KW)
    assert not (tmp_path / "fork").exists()


@pytest.mark.parametrize("fids, best_step", [((5.0, 3.0, 1.0), 3), ((1.0, 5.0, 7.0), 1)])
def test_best_holds_only_the_lowest_fid_step(made16, tmp_path, monkeypatch, fids, best_step):
    # FID monitor replaced by a fixed sequence (one value per step, fid_every=1).
    values = _fids(monkeypatch, fids)
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=3,
                   **{**KW, "save_every": 1, "fid_every": 1, "fid_ref": str(made16)})
    assert next(values, None) is None                      # one FID per step
    [(step, best)] = ckpt.list_checkpoints(out / "best")
    assert step == best_step
    # the weights of that step: those of the run's own checkpoint at it
    got = ckpt.load(best)
    want = ckpt.load(out / "checkpoints" / f"step_{best_step:09d}")
    assert got["step"] == best_step
    for k in ("model", "ema"):
        assert got[k].keys() == want[k].keys()
        for name in want[k]:
            assert torch.equal(got[k][name], want[k][name]), (k, name)
    other = ckpt.load(out / "checkpoints" / f"step_{4 - best_step:09d}")["ema"]
    assert any(not torch.equal(other[n], want["ema"][n]) for n in other)   # steps differ


def _fids(monkeypatch, values):
    """FidMonitor replaced by the FIDs ``values`` gives, one per call; the iterator they
    are taken from."""
    from blurfast import evaluation
    values = iter(values)

    class FixedFid:
        def __init__(self, *a, **k):
            pass

        def __call__(self, model, diff, progress=False):
            return next(values)
    monkeypatch.setattr(evaluation, "FidMonitor", FixedFid)
    return values


def _assert_best_is(out, step):
    """best/ holds one loadable checkpoint: the run's own of ``step``, whose FID is the
    lowest of fid.csv."""
    [(held, best)] = ckpt.list_checkpoints(out / "best")
    assert held == step
    rows = [r.split(",") for r in (out / "fid.csv").read_text().splitlines()[1:]]
    assert min(rows, key=lambda r: float(r[1]))[0] == str(step)
    got, want = ckpt.load(best), ckpt.load(out / "checkpoints" / f"step_{step:09d}")
    for k in ("model", "ema"):
        assert all(torch.equal(got[k][n], want[k][n]) for n in want[k]), k


def test_best_of_a_resumed_run_drops_the_steps_the_resume_cut(made16, tmp_path, monkeypatch):
    # FIDs 5 (step 2), 1 (step 4): best/ holds step 4. Resumed from step 2, fid.csv is cut
    # to step 2, but best/ kept step 4, of the part the resume cut: a worse FID at step 3
    # (6) left it there, the newest checkpoint of best/ and sampled as the best.
    out = tmp_path / "run"
    kw = {**KW, "save_every": 1, "keep": 10, "fid_every": 2, "fid_ref": str(made16)}
    _fids(monkeypatch, [5.0, 1.0])
    training.train(data=str(made16), out=str(out), steps=4, **kw)
    _assert_best_is(out, 4)
    _fids(monkeypatch, [6.0])
    training.train(data=str(made16), out=str(out), steps=3,
                   resume=str(out / "checkpoints" / "step_000000002"), **kw)
    _assert_best_is(out, 2)


def test_best_of_a_run_killed_before_its_save_is_copied_on_resume(made16, tmp_path,
                                                                  monkeypatch):
    # Killed between fid.csv's row of a new best (step 4: 1) and its save into best/:
    # best/ held step 2 (FID 5) while fid.csv's best was step 4's 1, and a resumed run
    # compared against 1, so best/ kept step 2 for good.
    out = tmp_path / "run"
    kw = {**KW, "save_every": 2, "fid_every": 2, "fid_ref": str(made16)}
    real = ckpt.save

    def killed(ckpt_dir, step, *a, **k):
        if Path(ckpt_dir).name == "best" and step == 4:
            raise KeyboardInterrupt
        return real(ckpt_dir, step, *a, **k)
    monkeypatch.setattr(ckpt, "save", killed)
    _fids(monkeypatch, [5.0, 1.0])
    with pytest.raises(KeyboardInterrupt):
        training.train(data=str(made16), out=str(out), steps=4, **kw)
    monkeypatch.setattr(ckpt, "save", real)
    assert [s for s, _ in ckpt.list_checkpoints(out / "best")] == [2]
    _fids(monkeypatch, [2.0])
    training.train(data=str(made16), out=str(out), steps=5, resume="auto", **kw)
    _assert_best_is(out, 4)


def test_cli_resume_with_a_new_preset_takes_the_presets_model(made16, tmp_path, capsys):
    # A --preset given on resume defines the model anew (the saved run's model entries are
    # dropped; model flags given with it still apply). Here the preset's model is not the
    # checkpoint's, so the run is refused naming the entries that differ.
    out = tmp_path / "r"
    tiny64 = {**TINY, "attention_resolutions": (8,)}           # paper64, made tiny
    training.train(data=str(made16), out=str(out), steps=1, preset="paper64",
                   **{**KW, "model": tiny64})

    def kwargs(*argv):
        return cli_train.train_kwargs(_parser().parse_args(
            ["train", "--out", str(out), "--resume", "auto", *argv]))
    assert kwargs()["model"]["channel_mult"] == (1, 2)          # no preset: the saved model
    kw = kwargs("--preset", "small")              # the saved emb_act alone kept
    assert kw["preset"] == "small" and kw["model"] == {"emb_act": True}
    kw = kwargs("--preset", "small", "--num-res-blocks", "1")
    assert kw["model"] == {"emb_act": True, "num_res_blocks": 1}
    capsys.readouterr()
    a = _parser().parse_args(["train", "--out", str(out), "--resume", "auto", "--steps", "2",
                              "--preset", "small"])
    assert a.func(a) == 2
    err = capsys.readouterr().err
    # small's entries: channel_mult (1, 2, 3, 4), num_res_blocks 2 (models.PRESETS); the
    # config is compared as JSON, so tuples read as lists
    assert "model.channel_mult [1, 2, 3, 4] differs from the checkpoint's [1, 2]" in err, err
    assert "model.num_res_blocks 2 differs from the checkpoint's 1" in err, err
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]


def test_cli_resume_with_a_new_preset_keeps_a_run_saved_before_emb_act(made16, tmp_path):
    # A recipe gives its preset on every run; a run saved before emb_act (no flag gives it)
    # still resumes: the new preset drops the saved model entries but that one.
    out = tmp_path / "r"
    training.train(data=str(made16), out=str(out), steps=1,
                   **{**KW, "model": {**TINY, "emb_act": False}})
    saved = json.loads((out / "config.json").read_text())
    del saved["model"]["emb_act"]
    (out / "config.json").write_text(json.dumps(saved))
    a = _parser().parse_args(["train", "--out", str(out), "--resume", "auto", "--steps", "2",
                              "--preset", "small", "--channel-mult", "1", "2",
                              "--num-res-blocks", "1"])
    assert cli_train.train_kwargs(a)["model"] == {"emb_act": False, "channel_mult": (1, 2),
                                                  "num_res_blocks": 1}
    assert a.func(a) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 1]


def test_a_torn_log_row_is_dropped_on_resume(made16, tmp_path):
    # A crash while a row is appended leaves it torn: a bare "1" (of "1x,..."), or a row
    # cut inside its last number, which still parses (only the missing newline tells).
    # Resuming drops either, and the rows after the resumed step; a log.csv damaged
    # beyond that is named.
    out, log = tmp_path / "run", tmp_path / "run" / "log.csv"

    def steps():
        return [int(r.split(",")[0]) for r in log.read_text().splitlines()[1:]]
    training.train(data=str(made16), out=str(out), steps=2, **KW)
    with open(log, "a") as f:
        f.write("1")
    training.train(data=str(made16), out=str(out), steps=3, resume="auto", **KW)
    assert steps() == [1, 2, 3]
    log.write_text(log.read_text()[:-2])          # row 3 without its newline and last digit
    training.train(data=str(made16), out=str(out), steps=4, resume="auto", **KW)
    assert steps() == [1, 2, 4]
    log.write_text("stp,images\n" + log.read_text().split("\n", 1)[1])
    with pytest.raises(ValueError, match=r"log\.csv: .*header"):
        training.train(data=str(made16), out=str(out), steps=5, resume="auto", **KW)


def test_fid_log_is_cut_to_the_resumed_step_and_torn_rows_are_dropped(made16, tmp_path,
                                                                        monkeypatch):
    # fid.csv as log.csv: on resume the rows of the lost part go, and a torn last row
    # ("6,35.2" cut to "6,0") neither counts as the best nor joins the next row.
    from blurfast import evaluation
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluation, "inception_extractor",
                        lambda path=None, device="cpu", download=True:
                        lambda x: x.mean(dim=(2, 3)))
    out, fid_csv = tmp_path / "run", tmp_path / "run" / "fid.csv"
    kw = {**KW, "fid_every": 2, "fid_ref": str(made16), "fid_n": 6, "fid_steps": 2}
    training.train(data=str(made16), out=str(out), steps=4, **kw)
    first = fid_csv.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in first] == ["2", "4"]
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_000000004")       # lost: resumed from step 2
    with open(fid_csv, "a") as f:
        f.write("6,0")
    training.train(data=str(made16), out=str(out), steps=4, resume="auto", **kw)
    rows = [r.split(",") for r in fid_csv.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["2", "4"] and rows[0] == first[0].split(",")
    # the best so far after the resume: from the whole rows alone
    assert training._FidLog(fid_csv, 4).best == min(float(r[1]) for r in rows)
    assert fid_csv.read_text().startswith("step,fid,kid\n")
    assert all(np.isfinite(float(r[2])) for r in rows)           # KID of each point
    # A log of an older run (step, fid) resumes with a kid column, nan in its rows.
    fid_csv.write_text("step,fid\n2,51.5\n4,49.25\n6,48.5\n")
    assert training._FidLog(fid_csv, 4).best == 49.25
    assert fid_csv.read_text() == "step,fid,kid\n2,51.5,nan\n4,49.25,nan\n"
    # A non-finite FID is logged but never the best, first row or not.
    fid_csv.write_text("step,fid,kid\n2,nan,nan\n4,49.25,nan\n")
    log = training._FidLog(fid_csv, 4)
    assert log.best == 49.25
    assert not log.add(6, float("nan")) and log.add(8, 49.0) and log.best == 49.0


def test_sigkill_during_save_resumes_from_the_last_good_checkpoint(made16, reference_run,
                                                                   tmp_path):
    out = tmp_path / "run"
    # The child dies (SIGKILL) inside its second save, after state.pt is written and
    # before the manifest and the rename.
    p = _child(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from blurfast import checkpoint, training
        real, calls = torch.save, []
        def save_then_die(*a, **k):
            real(*a, **k)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = save_then_die
        training.train(data={str(made16)!r}, out={str(out)!r}, steps=6, **{KW!r})
    """)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, log
    names = sorted(x.name for x in (out / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-step_000000004") and names[1:] == ["step_000000002"]
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load(next((out / "checkpoints").glob(".tmp-*")))
    res = training.train(data=str(made16), out=str(out), steps=6, resume="auto", **KW)
    _same_weights(res["model"], reference_run["model"])
    _same_weights(res["ema"], reference_run["ema"])
    assert not list((out / "checkpoints").glob(".tmp-*"))      # the stale temp is gone


def test_damaged_checkpoints(made16, reference_run, tmp_path):
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=4, **KW)
    newest = out / "checkpoints" / "step_000000004"
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is damaged"):
        ckpt.load(newest)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is damaged"):
        training.train(data=str(made16), out=str(out), steps=6, resume=str(newest), **KW)
    # resume='auto' warns, falls back to step 2, and still lands on the reference
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        res = training.train(data=str(made16), out=str(out), steps=6, resume="auto", **KW)
    _same_weights(res["model"], reference_run["model"])


def test_damaged_files_give_clear_errors(made16, tmp_path):
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=2, **KW)
    c = out / "checkpoints" / "step_000000002"
    with open(c / "state.pt", "r+b") as f:                # truncated
        f.truncate(100)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt is damaged \(size 100"):
        ckpt.load(c)
    # A file that was bad when written (manifest agrees with it): torch's error, wrapped.
    (c / "state.pt").write_bytes(b"PK\x03\x04 not really a zip")
    m = json.loads((c / "manifest.json").read_text())
    m["files"]["state.pt"] = {"bytes": (c / "state.pt").stat().st_size,
                              "sha256": ckpt._sha256(c / "state.pt")}
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt cannot be loaded"):
        ckpt.load(c)
    (c / "manifest.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is damaged"):
        ckpt.load(c)
    with pytest.raises(ckpt.CheckpointError, match="not a directory"):
        ckpt.load(out / "nothing")
    with pytest.raises(ckpt.CheckpointError, match=r"is a run directory; name one of .* "
                                                   r"resume='auto' \(--resume auto\)$"):
        training.train(data=str(made16), out=str(tmp_path / "r2"), steps=4, resume=str(out),
                       **KW)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint directory"):
        ckpt.load(out / "samples")


def test_a_malformed_manifest_is_a_damaged_checkpoint(made16, tmp_path):
    # Entries without a size or hash, of the wrong type, or not mappings: CheckpointError
    # (was a KeyError or TypeError), so the newest valid checkpoint is used instead.
    from blurfast.generate import resolve_checkpoint
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=4, **KW)
    newest, older = (out / "checkpoints" / f"step_00000000{s}" for s in (4, 2))
    good = json.loads((newest / "manifest.json").read_text())
    entry = good["files"]["state.pt"]
    for files in ({**good["files"], "state.pt": {"bytes": entry["bytes"]}},
                  {**good["files"], "state.pt": {"sha256": entry["sha256"]}},
                  {**good["files"], "state.pt": {**entry, "bytes": str(entry["bytes"])}},
                  {**good["files"], "state.pt": {**entry, "sha256": 0}},
                  {**good["files"], "state.pt": [entry["bytes"], entry["sha256"]]},
                  list(good["files"])):
        (newest / "manifest.json").write_text(json.dumps({**good, "files": files}))
        with pytest.raises(ckpt.CheckpointError, match=r"manifest\.json is damaged"):
            ckpt.verify(newest)
        with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
            assert ckpt.latest_valid(out / "checkpoints")["path"] == str(older)
        with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
            assert resolve_checkpoint(out) == older


def test_a_checkpoint_saved_before_emb_act_computes_what_it_did(tmp_path):
    # Its stored config has no emb_act: every reader (load_model for sampling and FID, load
    # for resume, stored_config and the CLI's saved arguments) rebuilds it without the SiLU.
    from blurfast.cli_train import saved_config
    torch.manual_seed(0)
    net = UNet(resolution=16, emb_act=False, **TINY)
    old = {k: v for k, v in net.config.items() if k != "emb_act"}
    cfg = {"model": old, "diffusion": BlurDiffusion(resolution=16).config}
    d = ckpt.save(tmp_path / "run" / "checkpoints", 1, net, net, {}, cfg)
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    model, _, got = ckpt.load_model(d)
    assert model.emb_act is False and got["model"]["emb_act"] is False
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), net(x, t))
    assert ckpt.load(d)["config"]["model"]["emb_act"] is False
    assert ckpt.stored_config(d)["model"]["emb_act"] is False
    assert saved_config("auto", tmp_path / "run")["model"]["emb_act"] is False
    assert saved_config(d, tmp_path / "run")["model"]["emb_act"] is False


def test_load_model_for_sampling(reference_run):
    model, diff, cfg = ckpt.load_model(reference_run["checkpoint"])
    _same_weights(model, reference_run["ema"])
    assert diff == BlurDiffusion(resolution=16) and cfg["steps"] == 6
    raw, _, _ = ckpt.load_model(Path(reference_run["checkpoint"]) / "model.safetensors",
                                ema=False)
    _same_weights(raw, reference_run["model"])


# ------------------------------------------------------------------------ randomness

def test_step_draws_are_uniform_on_1_to_n_minus_1_and_ranks_slice_the_global_draw():
    # t uniform on 1..N-1 (t = 0 is the clean image, N outside the chain), flips fair
    # coins; rank r of k with local batch b gets slice [r b, (r + 1) b) of the global draw.
    from scipy import stats
    n, B, steps = 10, 512, 20
    draws = [training.step_draws(7, s, B, n) for s in range(steps)]
    t = torch.cat([d[0] for d in draws]).numpy()
    flips = torch.cat([d[1] for d in draws]).numpy()
    assert t.min() == 1 and t.max() == n - 1                  # both ends, nothing beyond
    counts = np.bincount(t, minlength=n)[1:]
    # uniformity: 10240 draws over 9 values; p of a fair draw is uniform on [0, 1]
    assert stats.chisquare(counts).pvalue > 1e-4, counts
    # flips: Binomial(10240, 1/2) has sd 51; 5 sd
    assert abs(int(flips.sum()) - B * steps / 2) < 5 * 0.5 * np.sqrt(B * steps)
    assert len({d[2] for d in draws}) == steps                # a noise seed per step
    for k in (2, 4):
        b = B // k
        parts = [training.step_draws(7, 3, B, n, rank=r, local_batch=b) for r in range(k)]
        assert torch.equal(torch.cat([p[0] for p in parts]), draws[3][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), draws[3][1])
        assert {p[2] for p in parts} == {draws[3][2]}         # the noise seed is shared


def test_derive_seed_keeps_its_values_and_refuses_ints_outside_0_to_2_64():
    # Every run's draws come from these values: pinned, as SeedSequence gave them before
    # the range check.
    assert [training.derive_seed(*t) for t in
            [(0, 0, 0), (0, 7, 1), (12345, 99, 2), (3, 10, 3, 1), (2 ** 64 - 1, 0, 0)]] == \
        [3527577169254209511, 2849028877725374000, 2299743542185214306, 3906225516791799033,
         1336633463699972433]
    assert training.derive_seed(np.int64(12345), 99, 2) == 2299743542185214306
    for bad, at in ((-1, 0), (2 ** 64, 0), (1.0, 1), (True, 1), ("3", 2), (None, 2)):
        ints = [7, 7, 7]
        ints[at] = bad
        with pytest.raises(ValueError, match=rf"^ints\[{at}\]: expected an int in \[0, 2\*\*64\), "
                                             rf"got {re.escape(repr(bad))}$"):
            training.derive_seed(*ints)


# ------------------------------------------------------------------------ DDP

@pytest.mark.parametrize("grad_accum, checkpointing", [(1, False), (2, False), (2, True)])
def test_ddp_two_gloo_processes_match_one_process(made16, tmp_path, grad_accum, checkpointing):
    # adam_eps = 1: the update lr m / (sqrt(v) + 1) is then smooth in the gradient. With
    # eps = 1e-8, a weight whose gradient is at rounding level gets a step of up to lr in
    # either direction, so two correct runs could differ by that much. grad_accum 2: each
    # rank's batch in two rounds, all-reduced in the second's backward only (no_sync in
    # the first; a rank that skipped the all-reduce would drift from the other); with
    # activation checkpointing, DDP's gradient hooks fire in the recomputing backward.
    kw = {**KW, "batch_size": 2, "save_every": 1000, "adam_eps": 1.0, "lr": 0.1,
          "grad_accum": grad_accum, "activation_checkpointing": checkpointing}
    script = f"""
        import os, torch
        torch.set_num_threads(1)
        from blurfast import training
        r = training.train(data={str(made16)!r}, out={str(tmp_path / 'ddp')!r}, steps=4, **{kw!r})
        torch.save(r["model"].state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """
    _two_gloo_ranks(script)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k             # identical on both ranks
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 4
    one = training.train(data=str(made16), out=str(tmp_path / "one"), steps=4,
                         **{**kw, "batch_size": 4, "grad_accum": 1,
                            "activation_checkpointing": False})
    # The same examples, steps and noise: the logged losses (all-reduced over the ranks)
    # agree to rounding, and so do the weights: gradients summed in another order differ
    # by about 1e-6 of their size (at most 1 here), which moves a weight by at most
    # lr * 1e-6 per step.
    losses = [[float(r.split(",")[2]) for r in (tmp_path / d / "log.csv").read_text()
               .splitlines()[1:]] for d in ("ddp", "one")]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    torch.manual_seed(KW_SEED)
    init = UNet(**one["model"].config).state_dict()
    moved, atol = 0.0, 4 * kw["lr"] * 1e-6
    for k, v in one["model"].state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=0, atol=atol)
        moved = max(moved, (v - init[k]).abs().max().item())
    assert moved > 1000 * atol                           # and training did move them


def test_two_gloo_processes_resume_the_checkpoint_rank_0_found(made16, tmp_path):
    # A run that saved while the ranks started: rank 0 found step 2 as the newest valid
    # checkpoint, rank 1 (later) step 4. Both resume from step 2 (without this they ran
    # different step counts: their all-reduces would not pair).
    kw = {**KW, "batch_size": 2, "save_every": 2}
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=4, **{**kw, "batch_size": 4})
    script = f"""
        import os, torch
        torch.set_num_threads(1)
        from blurfast import checkpoint as ckpt, training
        if os.environ["RANK"] == "0":
            real = ckpt.load
            ckpt.latest_valid = lambda d: real(d / "step_000000002")
        r = training.train(data={str(made16)!r}, out={str(out)!r}, steps=6, resume="auto",
                           **{kw!r})
        torch.save(dict(model=r["model"].state_dict(), run=r["steps_run"]),
                   {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """
    logs = _two_gloo_ranks(script)
    assert "resuming from " in logs[0] and "step_000000002 (step 2)" in logs[0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["run"] == r1["run"] == 4
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k


def _compiled_dropout_is_eagers() -> bool:
    """Whether torch.compile (Inductor, fallback_random) draws the dropout masks that eager
    draws from the same seed: a small conv net's output and gradient, compiled and not."""
    import unittest.mock

    import torch._inductor.config
    import torch.nn as nn
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                        nn.Dropout(0.1), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)

    def run(f):
        net.zero_grad()
        torch.manual_seed(0)
        y = f(x)
        y.square().mean().backward()
        return y.detach(), net[0].weight.grad.clone()
    with unittest.mock.patch.object(torch._inductor.config, "fallback_random", True):
        eager, compiled = run(net), run(torch.compile(net))
    torch._dynamo.reset()
    return all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(eager, compiled))


@pytest.mark.parametrize("compiled", [False, True])
def test_the_flat_all_reduce_is_ddps_step(tmp_path, compiled):
    # TrainStep(ddp="flat") (what a captured step of several processes runs: the gradients
    # views of one buffer, all-reduced once after the backward) against DDP's buckets,
    # two gloo processes, grad_accum 2, dropout 0.1, no clipping (which would hide the
    # gradients' scale). Each rank starts from other weights:
    # both take rank 0's. The ranks end identical, and the two ways agree to rounding
    # (DDP sums in buckets, in another order; adam_eps 1 keeps Adam's update smooth, see
    # test_ddp_two_gloo_processes_match_one_process). compiled: both under torch.compile
    # (Inductor, drawing dropout masks as eager does; DDP's graph split at its buckets),
    # against the same steps uncompiled. The gradients dropped by a zero_grad between
    # steps: the flat step makes them views of its buffer again.
    script = f"""
        import torch, torch.distributed as dist
        torch.set_num_threads(1)
        torch._inductor.config.fallback_random = True     # eager's dropout masks
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        from blurfast import training
        from blurfast.diffusion import BlurDiffusion
        from blurfast.models import UNet
        diff = BlurDiffusion(resolution=16)
        out = {{}}
        for mode in ("True", "flat", "compiled True", "compiled flat"):
            if mode.startswith("compiled") and not {compiled!r}:
                continue
            torch.manual_seed(100 + rank)
            init = UNet.from_preset("small", resolution=16, dropout=0.1, **{TINY!r})
            net = UNet(**init.config)
            net.load_state_dict(init.state_dict())
            ddp = {{"True": True, "flat": "flat"}}[mode.split()[-1]]
            step = training.TrainStep(net, diff, device="cpu", ddp=ddp, lr=0.1, adam_eps=1.0,
                                      grad_accum=2, grad_clip=None,
                                      compile=mode.startswith("compiled"))
            g = torch.Generator().manual_seed(7)
            for i in range(3):
                x = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
                flip = torch.rand(8, generator=g) < 0.5
                t = torch.randint(1, diff.num_steps, (8,), generator=g)
                rows = slice(4 * rank, 4 * rank + 4)
                torch.manual_seed(1000 + 10 * i + rank)             # dropout
                if i == 1:        # the flat step gives its gradients their views back
                    net.zero_grad()
                step(x[rows], flip[rows], t[rows], i, rank * 4 * 3 * 16 * 16)
            out[str(mode)] = dict(init=init.state_dict(), model=net.state_dict(),
                                  ema=step.ema.state_dict(),
                                  stats=step.read_stats(all_reduce=True))
        torch.save(out, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
        dist.destroy_process_group()
    """
    _two_gloo_ranks(script)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    lr = 0.1
    modes = ["True", "flat"] + (["compiled True", "compiled flat"] if compiled else [])
    for mode in modes:
        assert r0[mode]["stats"] == r1[mode]["stats"]
        assert r0[mode]["stats"]["skipped_total"] == 0
        for part in ("model", "ema"):
            for k, v in r0[mode][part].items():
                assert torch.equal(v, r1[mode][part][k]), (mode, part, k)
    moved = 0.0
    # Compiled against eager needs Inductor to draw eager's dropout masks; torch 2.11 does
    # not, even with fallback_random (its compiled steps differ from eager's by 1e-4 with
    # dropout, by 1e-8 without). There the flat step is held to DDP's, both compiled.
    same_masks = not compiled or _compiled_dropout_is_eagers()
    for mode in modes[1:]:
        if mode == "compiled True" and not same_masks:
            continue
        ref = r0["compiled True" if mode == "compiled flat" else "True"]
        assert r0[mode]["stats"]["loss"] == pytest.approx(ref["stats"]["loss"], rel=1e-5)
        for k, v in r0[mode]["model"].items():
            # gradients summed in another order: about 1e-6 of their size, at most
            # lr * 1e-6 per step on a weight (3 steps)
            torch.testing.assert_close(v, ref["model"][k], rtol=0, atol=4 * lr * 1e-6,
                                       msg=lambda m: f"{mode}, model {k}: {m}")
            torch.testing.assert_close(r0[mode]["ema"][k], ref["ema"][k], rtol=0,
                                       atol=4 * lr * 1e-6, msg=lambda m: f"{mode}, ema {k}: {m}")
            moved = max(moved, (v - r0[mode]["init"][k]).abs().max().item())
    assert moved > 1000 * 4 * lr * 1e-6                 # the steps did move the weights
    # The ranks began apart; rank 0's initial weights won.
    assert any(not torch.equal(v, r1["flat"]["init"][k]) for k, v in r0["flat"]["init"].items())


def test_the_flat_all_reduce_leaves_frozen_parameters_alone(tmp_path):
    # A parameter with requires_grad off has no gradient in one process and under DDP, so
    # Adam passes over it; ddp="flat" must not give it one (a zero gradient that Adam's
    # weight decay turns into a step). One gloo process: the three ways take the same
    # steps, and the frozen weights stay as they were.
    script = f"""
        import torch, torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        from blurfast import training
        from blurfast.diffusion import BlurDiffusion
        from blurfast.models import UNet
        diff = BlurDiffusion(resolution=16)
        out = {{}}
        for mode in (False, True, "flat"):
            torch.manual_seed(0)
            net = UNet.from_preset("small", resolution=16, **{TINY!r})
            net.out.requires_grad_(False)
            out[str(mode) + " init"] = {{k: v.clone() for k, v in net.state_dict().items()}}
            step = training.TrainStep(net, diff, device="cpu", ddp=mode, lr=0.01,
                                      weight_decay=0.1)
            g = torch.Generator().manual_seed(7)
            for i in range(2):
                x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
                t = torch.randint(1, diff.num_steps, (4,), generator=g)
                step(x, torch.zeros(4, dtype=torch.bool), t, i, 0)
            out[str(mode)] = net.state_dict()
        torch.save(out, {str(tmp_path)!r} + "/out.pt")
        dist.destroy_process_group()
    """
    p = _child(script, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    init = out["False init"]
    frozen = [k for k in init if k.startswith("out.")]
    assert any(init[k].abs().max() > 0 for k in frozen)        # weight decay would move it
    for mode in ("False", "True", "flat"):
        for k in frozen:
            assert torch.equal(out[mode][k], init[k]), (mode, k)
        for k, v in out[mode].items():
            torch.testing.assert_close(v, out["False"][k], rtol=0, atol=1e-6)
    assert any(not torch.equal(out["flat"][k], init[k]) for k in init)   # it did train


def test_cli_under_two_processes_prints_on_rank_0_only(made16, tmp_path):
    # `torchrun -m blurfast train` with two gloo processes: the closing line comes once.
    argv = ["train", "--data", str(made16), "--out", str(tmp_path / "r"), "--resolution", "16",
            "--batch-size", "2", "--steps", "2", "--base-channels", "32", "--channel-mult",
            "1", "2", "--num-res-blocks", "1", "--sample-count", "1", "--sample-steps", "1",
            "--no-progress", "--device", "cpu"]
    script = f"""
        import sys, torch
        torch.set_num_threads(1)
        from blurfast import cli
        sys.exit(cli.main({argv!r}))
    """
    logs = _two_gloo_ranks(script)
    assert logs[0].count("done: step 2, loss ") == 1
    assert "done:" not in logs[1]


def test_two_ranks_end_their_gloo_group_with_nothing_left_holding_it(made16, tmp_path):
    # DistributedDataParallel sits in reference cycles, and its reducer holds the process
    # group: left to Python, gloo's real teardown came at a later collection or the
    # interpreter's exit, after the peer had gone (an abort, 'terminate called', in some
    # runs). With automatic collection off, nothing of the group may outlive train(); each
    # of two 2-rank runs exits 0.
    kw = {**KW, "batch_size": 2}
    for run in range(2):
        script = f"""
            import gc, torch
            torch.set_num_threads(1)
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel
            from blurfast import training
            gc.disable()
            training.train(data={str(made16)!r}, out={str(tmp_path / f"run{run}")!r}, steps=2,
                           **{kw!r})
            assert not dist.is_initialized()
            left = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
            print("DDP objects left:", len(left))
        """
        logs = _two_gloo_ranks(script)
        assert all("DDP objects left: 0" in log for log in logs), logs


def test_a_rank_whose_peer_stopped_says_so_in_one_line(made16, tmp_path):
    # Rank 0 fails as it starts writing the run (its own one-line error, exit 2); rank 1,
    # in its first step's all-reduce, loses its peer: one line saying so (exit 1), not
    # gloo's traceback. Run as `python -m blurfast` (cli.entry): the rank then exits at
    # once; through the interpreter's teardown, gloo aborted it in 1 of 6 runs.
    argv = ["train", "--data", str(made16), "--out", str(tmp_path / "r"), "--resolution", "16",
            "--batch-size", "2", "--steps", "2", "--base-channels", "32", "--channel-mult",
            "1", "2", "--num-res-blocks", "1", "--no-progress", "--device", "cpu"]
    script = f"""
        import os, sys, torch
        torch.set_num_threads(1)
        from blurfast import cli, training
        if os.environ["RANK"] == "0":
            def broken(*a, **k):
                raise ValueError("log: made to fail")
            training._Log = broken
        import runpy
        sys.argv = ["blurfast"] + {argv!r}
        runpy.run_module("blurfast", run_name="__main__")
    """
    procs = _start_two_ranks(script)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 1], logs
    assert "blurfast train: error: rank 0: log: made to fail" in logs[0]
    assert "blurfast train: error: rank 1: another process of the group stopped" in logs[1]
    assert "Traceback" not in logs[1], logs[1]


def test_the_same_error_on_two_ranks_says_whose_each_line_is(tmp_path):
    # --data missing, found once the process group has started: each rank prints the
    # error, once, under its own rank.
    argv = ["train", "--data", str(tmp_path / "none.npy"), "--out", str(tmp_path / "r"),
            "--resolution", "16", "--batch-size", "2", "--steps", "2", "--base-channels",
            "32", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--no-progress",
            "--device", "cpu"]
    script = f"""
        import sys, torch
        torch.set_num_threads(1)
        from blurfast import cli
        sys.exit(cli.main({argv!r}))
    """
    procs = _start_two_ranks(script)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], logs
    for r, log in enumerate(logs):
        errors = [line for line in log.splitlines() if "error" in line]
        assert len(errors) == 1, log
        assert errors[0].startswith(f"blurfast train: error: rank {r}: data (--data): "), log


def test_a_bad_flag_under_torchrun_says_whose_line_it_is(monkeypatch, capsys):
    # argparse's one-line errors too: every rank parses the same command line.
    from blurfast import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--precision", "fp8"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(
        "blurfast train: error: rank 1: argument --precision: invalid choice: 'fp8'")


@pytest.mark.parametrize("env, named", [({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
                                        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
                                        ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK"),
                                        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK")])
def test_a_malformed_torchrun_environment_is_one_error_line(monkeypatch, capsys, env, named):
    # WORLD_SIZE and RANK are read before any command runs: one line naming the variable,
    # exit 2, for every command (a one-process one and one that runs under torchrun).
    from blurfast import cli, distributed
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for argv in (["fid"], ["train", "--precision", "fp8"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"blurfast {argv[0]}: error: {named}: expected an int ") \
            and err.endswith(f"got {env[named]!r}\n") and err.count("\n") == 1, err
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match=r"^(WORLD_SIZE|RANK): expected an int "):
        distributed.setup_processes("cpu")
    for k in env:
        monkeypatch.delenv(k)
    with pytest.raises(ValueError, match=r"^LOCAL_RANK: expected an int >= 0 .* got '-1'$"):
        distributed.setup_processes("cpu")


def test_sigterm_to_one_rank_stops_both_at_the_next_log_point_and_rank_0_saves(made16,
                                                                               tmp_path):
    # The ranks agree on a stop only at log points (no host synchronization between):
    # SIGTERM to rank 1 alone stops both at the next multiple of --log-every, where rank 0
    # saves; both exit with 143.
    out = tmp_path / "r"
    argv = ["train", "--data", str(made16), "--out", str(out), "--resolution", "16",
            "--batch-size", "2", "--steps", "100000", "--log-every", "4", "--save-every",
            "100000", "--base-channels", "32", "--channel-mult", "1", "2",
            "--num-res-blocks", "1", "--no-progress", "--device", "cpu"]
    script = f"""
        import sys, torch
        torch.set_num_threads(1)
        from blurfast import cli
        sys.exit(cli.main({argv!r}))
    """
    procs = _start_two_ranks(script)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.csv").is_file() or \
                len((out / "log.csv").read_text().splitlines()) < 2:   # step 4 logged
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                procs[0].communicate()[0]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], logs
    [(step, _)] = ckpt.list_checkpoints(out / "checkpoints")
    assert step % 4 == 0 and step > 4
    assert int((out / "log.csv").read_text().splitlines()[-1].split(",")[0]) == step
    assert f"signal on another rank: saved {out / 'checkpoints' / f'step_{step:09d}'}" in logs[0]
    # only rank 0 announces a signal (_Signals(announce)); rank 1, signalled, says nothing
    assert "SIGTERM: stopping" not in logs[1], logs[1]


def test_sigterm_to_a_rank_waiting_for_rank_0s_last_save_ends_both_as_signalled(made16,
                                                                                 tmp_path):
    # Rank 1 is past the last log point, waiting while rank 0 draws its last grid, when
    # SIGTERM reaches it: the run is saved (its last step), and both ranks end as a
    # signalled run does (143), not rank 1 killed and rank 0 losing its peer (exit 1).
    out = tmp_path / "r"
    argv = ["train", "--data", str(made16), "--out", str(out), "--resolution", "16",
            "--batch-size", "2", "--steps", "2", "--base-channels", "32", "--channel-mult",
            "1", "2", "--num-res-blocks", "1", "--sample-count", "1", "--sample-steps", "1",
            "--no-progress", "--device", "cpu"]
    script = f"""
        import os, sys, time, torch
        torch.set_num_threads(1)
        from pathlib import Path
        from blurfast import cli, training
        if os.environ["RANK"] == "0":
            draw, marks = training._save_samples, Path({str(tmp_path)!r})
            def held(*a, **k):          # the last grid waits until rank 1 is signalled
                (marks / "drawing").touch()
                deadline = time.monotonic() + 60
                while not (marks / "signalled").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return draw(*a, **k)
            training._save_samples = held
        sys.exit(cli.main({argv!r}))
    """
    procs = _start_two_ranks(script)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "drawing").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                procs[0].communicate()[0]
            time.sleep(0.05)
        time.sleep(1.0)                 # rank 1 reaches the ranks' last meeting
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        (tmp_path / "signalled").touch()
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], logs
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert (f"signal on another rank after the last step: saved "
            f"{out / 'checkpoints' / 'step_000000002'}") in logs[0]
    assert "done:" not in logs[0] and "Traceback" not in logs[0] + logs[1], logs


@pytest.mark.parametrize("command", [
    ["prepare", "SRC", "OUT", "--resolution", "16", "--workers", "0", "--no-progress"],
    ["fid", "--samples", "SRC", "--ref", "SRC", "--features", "no_such_module:f"],
    ["draw", "process", "--data", "SRC", "--resolution", "16", "--n", "2", "--out",
     "OUT.png"],
    # run as one process below, each stops at its own argument error (no 10-minute demo)
    ["demo", "--out", "OUT", "--minutes", "-1"],
    ["bench", "--iters", "0", "--json", "OUT"]])
def test_one_process_commands_refuse_torchrun_once_before_any_work(command, tmp_path,
                                                                   monkeypatch, capsys):
    # Under torchrun every rank would run the whole command into the same files: each
    # refuses with exit code 2 and writes nothing; rank 0 alone says why.
    from blurfast import cli
    src = made_photos(tmp_path / "src", 2, size=16)
    argv = [{"SRC": str(src), "OUT": str(tmp_path / "out.npy"),
             "OUT.png": str(tmp_path / "out.png")}.get(a, a) for a in command]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err == ("" if rank == "1" else
                       f"blurfast {command[0]}: error: runs as one process, not under "
                       f"torchrun (WORLD_SIZE=2: each process would do all of it and write "
                       f"the same files); run blurfast {command[0]} without torchrun\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.delenv("WORLD_SIZE")                 # one process: the command runs
    monkeypatch.setenv("RANK", "0")
    try:
        cli.main(argv)
    except (SystemExit, ValueError) as e:            # demo's and bench's argument errors
        assert "runs as one process" not in str(e)
    assert "runs as one process" not in capsys.readouterr().err


def test_info_under_torchrun_prints_each_ranks_lines_after_its_rank():
    # Under torchrun every rank printed info's lines unmarked, N copies interleaved: each
    # rank's lines now say whose they are, and end with the rank's device.
    script = """
        import sys
        from blurfast import cli
        sys.exit(cli.main(["info"]))
    """
    procs = _start_two_ranks(script)
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    one = _child(script)                                 # one process
    alone = one.communicate(timeout=120)[0]
    assert one.returncode == 0 and not alone.startswith("rank"), alone
    for rank, log in enumerate(logs):
        lines = log.splitlines()
        assert all(line.startswith(f"rank {rank}: ") for line in lines), log
        body = "".join(line[len(f"rank {rank}: "):] + "\n" for line in lines[:-1])
        assert body == alone
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if rank < seen:
            assert lines[-1] == f"rank {rank}: device: cuda:{rank} (LOCAL_RANK {rank})"
        elif not seen:
            assert lines[-1] == f"rank {rank}: device: cpu (torch sees no GPU)"
        else:
            assert lines[-1].startswith(f"rank {rank}: device: none: this process is "
                                       f"LOCAL_RANK {rank} of a machine ")


# ------------------------------------------------------------------------ the update

@pytest.mark.parametrize("grad_clip", [0.05, None])
def test_step_is_clip_adam_and_ema_done_by_hand(grad_clip):
    # The step against the textbook update in float64: the gradient scaled by
    # min(1, clip / (norm + 1e-6)), one Adam step, then ema += (1 - beta) (param - ema).
    # Adam's first moment after one step is (1 - beta1) times the clipped gradient, so
    # it shows the clipping directly (Adam's own step is nearly blind to the scale).
    import copy
    import torch.nn.functional as F
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    ref = copy.deepcopy(model).double()
    step = training.TrainStep(model, diff, device="cpu", lr=1e-3, grad_clip=grad_clip,
                              ema_beta=0.75, flip=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    t, flip = torch.tensor([3, 40, 400, 990]), torch.zeros(4, dtype=torch.bool)
    step(x, flip, t, 5, 0)

    x_t, y = step.noised(D.to_float(x), t, 5, 0)
    F.mse_loss(ref(x_t.double(), t), y.double()).backward()
    grads = [p.grad for p in ref.parameters()]
    norm = torch.stack([gr.pow(2).sum() for gr in grads]).sum().sqrt().item()
    scale = 1.0 if grad_clip is None else min(1.0, grad_clip / (norm + 1e-6))
    assert (scale < 0.5) == (grad_clip is not None)      # the clip binds where it is set
    for p, gr, e in zip(ref.parameters(), grads, step.ema_params):
        gc = gr * scale
        new = p - 1e-3 * gc / (gc.abs() + 1e-8)     # Adam's first step, bias-corrected
        torch.testing.assert_close(e.double(), p + 0.25 * (new - p), rtol=1e-5, atol=1e-7)
    # float32 against float64 gradients: compared as whole vectors
    m = torch.cat([step.opt.state[q]["exp_avg"].double().flatten() for q in step.params])
    want = 0.1 * scale * torch.cat([gr.flatten() for gr in grads])
    assert (m - want).norm() <= 1e-4 * want.norm()
    assert step.read_stats()["grad_norm"] == pytest.approx(norm, rel=1e-4)


class _Affine(torch.nn.Module):
    """x * w + b per channel, and a frozen parameter the forward never reads."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(1 + 0.1 * torch.randn(3, 1, 1, generator=g))
        self.b = torch.nn.Parameter(0.1 * torch.randn(3, 1, 1, generator=g))
        self.frozen = torch.nn.Parameter(torch.randn(5, generator=g), requires_grad=False)

    def forward(self, x, t):
        return x * self.w + self.b


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_steps_are_adam_or_adamw_with_weight_decay_clipping_and_ema_done_by_hand(
        optimizer, grad_accum):
    # Three steps of a per-channel affine model (its gradient is far from 0, so Adam's
    # update is no sign test) against torch's Adam and AdamW written out in float64: the
    # gradient of the batch's mean loss divided by max(1, (norm + 1e-6) / clip), then
    # Adam's L2 decay (g += wd p) or AdamW's decoupled one (p *= 1 - lr wd), the moments,
    # the bias-corrected update, and ema += (1 - beta) (p - ema). The learning rate changes
    # between steps (set_lr); the frozen parameter has no gradient and must not move.
    diff = BlurDiffusion(resolution=16)
    lr, betas, wd, eps, clip, beta = 1e-2, (0.8, 0.95), 0.1, 1e-8, 0.2, 0.75
    step = training.TrainStep(_Affine(), diff, device="cpu", lr=lr, optimizer=optimizer,
                              betas=betas, weight_decay=wd, adam_eps=eps, grad_clip=clip,
                              ema_beta=beta, flip=False, grad_accum=grad_accum)
    frozen = step.model.frozen.detach().clone()
    p = {n: v.detach().double().clone() for n, v in step.model.named_parameters()
         if v.requires_grad}
    ema = {n: v.clone() for n, v in p.items()}
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v2 = {n: torch.zeros_like(v) for n, v in p.items()}
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for k in range(1, 4):
        x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        t = torch.randint(1, diff.num_steps, (4,), generator=g)
        lr_k = lr * k / 3
        step.set_lr(lr_k)
        step(x, torch.zeros(4, dtype=torch.bool), t, 10 + k, 0)

        x_t, y = step.noised(D.to_float(x), t, 10 + k, 0)
        q = {n: v.clone().requires_grad_() for n, v in p.items()}
        loss = ((x_t.double() * q["w"] + q["b"] - y.double()) ** 2).mean()
        grads = dict(zip(q, torch.autograd.grad(loss, list(q.values()))))
        norm = torch.stack([gr.pow(2).sum() for gr in grads.values()]).sum().sqrt()
        div = max(1.0, (norm.item() + 1e-6) / clip)
        clipped += div > 1
        for n in p:
            gr = grads[n] / div
            if optimizer == "adam":
                gr = gr + wd * p[n]
            else:
                p[n] = p[n] * (1 - lr_k * wd)
            m[n] = betas[0] * m[n] + (1 - betas[0]) * gr
            v2[n] = betas[1] * v2[n] + (1 - betas[1]) * gr ** 2
            mhat, vhat = m[n] / (1 - betas[0] ** k), v2[n] / (1 - betas[1] ** k)
            p[n] = p[n] - lr_k * mhat / (vhat.sqrt() + eps)
            ema[n] = ema[n] + (1 - beta) * (p[n] - ema[n])
    assert 0 < clipped < 3        # norms near 0.2: the clip binds in some steps, not all
    got = dict(step.model.named_parameters())
    got_ema = dict(step.ema.named_parameters())
    for n in p:
        torch.testing.assert_close(got[n].double(), p[n], rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(got_ema[n].double(), ema[n], rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(step.model.frozen, frozen)
    assert torch.equal(step.ema.frozen, frozen)


def _fp32_and_fp16_steps():
    """(diff, model, a float32 step of a copy of it, an fp16 step of it, a batch
    (x, flip, t)) of TINY at 16 x 16, seeded."""
    import copy
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    f32 = training.TrainStep(copy.deepcopy(model), diff, device="cpu", lr=1e-3)
    step = training.TrainStep(model, diff, device="cpu", lr=1e-3, precision="fp16")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    t = torch.randint(1, diff.num_steps, (4,), generator=g)
    return diff, model, f32, step, (x, torch.zeros(4, dtype=torch.bool), t)


@pytest.mark.parametrize("grad_clip", [0.05, None])
def test_a_loss_scale_leaves_the_update_as_it_was_bit_for_bit(grad_clip):
    # fp16's loss scale in float32 (the scale set by hand on an fp32 step): a power of two
    # multiplies every gradient exactly (each backward op is linear in its upstream
    # gradient), and the update divides it out exactly, so three steps (grad_accum 2,
    # clipping on and off) give the weights, EMA, Adam moments and counters of the same
    # steps without it, bit for bit.
    import copy
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    steps = [training.TrainStep(copy.deepcopy(model), diff, device="cpu", lr=1e-3,
                                grad_clip=grad_clip, ema_beta=0.5, grad_accum=2)
             for _ in range(2)]
    scaled = steps[1]
    scaled._scale, scaled._good = torch.tensor(2.0 ** 20), torch.zeros(())
    g = torch.Generator().manual_seed(3)
    for k in range(3):
        x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        t = torch.randint(1, diff.num_steps, (4,), generator=g)
        for s in steps:
            s(x, torch.tensor([True, False, k % 2 == 1, False]), t, 9, 4 * k)
    ref = steps[0]
    assert scaled.read_stats() == ref.read_stats()
    assert scaled._scale.item() == 2.0 ** 20 and scaled._good.item() == 3
    for a, b in zip([*ref.params, *ref.ema_params], [*scaled.params, *scaled.ema_params]):
        assert torch.equal(a, b)
    for a, b in zip(ref.params, scaled.params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref.opt.state[a][key], scaled.opt.state[b][key])
        assert torch.equal(a.grad, b.grad)     # fused Adam divides them in place: the same


def test_fp16_steps_scale_the_loss_down_at_a_non_finite_gradient_and_up_after_good_ones(
        monkeypatch):
    # precision="fp16" (float16 autocast): a step whose gradient is not finite (a target
    # of 1e30 here) is skipped, weights untouched, and halves the scale; finite steps
    # update the weights, and _SCALE_GROWTH (2 here) of them in a row double it. The
    # scale and its count go through state_dict. The unscaled gradient of an fp16 step is
    # the float32 step's within float16's rounding.
    import copy
    monkeypatch.setattr(training, "_SCALE_GROWTH", 2)
    diff, model, f32, step, (x, flip, t) = _fp32_and_fp16_steps()
    normal = training.TrainStep.noised

    def huge(self, x0, t, noise_seed=0, noise_offset=0):
        x_t, y = normal(self, x0, t, noise_seed, noise_offset)
        return x_t, y + 1e30
    before = [p.detach().clone() for p in step.params]
    monkeypatch.setattr(training.TrainStep, "noised", huge)
    step(x, flip, t, 1, 0)
    monkeypatch.setattr(training.TrainStep, "noised", normal)
    assert step._scale.item() == 2.0 ** 15 and step._good.item() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, step.params))
    assert step.read_stats()["skipped_total"] == 1
    seen = []
    for k in range(3):
        step(x, flip, t, 2 + k, 0)
        seen.append((step._scale.item(), step._good.item()))
    assert seen == [(2.0 ** 15, 1), (2.0 ** 16, 0), (2.0 ** 16, 1)]
    assert not all(torch.equal(a, b) for a, b in zip(before, step.params))
    assert step.read_stats()["skipped_total"] == 1
    again = training.TrainStep(copy.deepcopy(model), diff, device="cpu", precision="fp16")
    again.load_state_dict(step.state_dict(), step.model.state_dict(), step.ema.state_dict())
    assert (again._scale.item(), again._good.item()) == (2.0 ** 16, 1)
    plain = training.TrainStep(copy.deepcopy(model), diff, device="cpu")
    plain.load_state_dict(step.state_dict(), step.model.state_dict(), step.ema.state_dict())
    assert plain._scale is None and "loss_scale" not in plain.state_dict()
    # One step each from the same weights: float16 against float32 gradients.
    step.model.load_state_dict(f32.model.state_dict())
    f32(x, flip, t, 7, 0)
    step(x, flip, t, 7, 0)
    ga = torch.cat([p.grad.flatten() for p in f32.params])    # clipped and unscaled by
    gb = torch.cat([p.grad.flatten() for p in step.params])   # fused Adam, in place
    # measured 4e-4 of the norm (float16 keeps 11 significant bits: 4.9e-4 rounding)
    assert (ga - gb).norm() <= 4e-3 * ga.norm()


def test_fp16_scale_stops_halving_at_1_so_a_run_goes_on_after_non_finite_steps(monkeypatch):
    # 99 non-finite steps in a row (one fewer than train()'s max_nonfinite, so a run goes
    # on) halve the scale 99 times from 2^16; below 1 it would shrink the gradients, which
    # float16 flushes to zero (2^-83: every one of them; 0 after 166 halvings, where
    # norm / scale is nan and every later step is skipped), and finite steps double it
    # back only every 2000 steps. It stops at 1 (fp16 autocast unscaled): the next finite
    # step is the float32 step's, within float16's rounding, as in the test above.
    import math
    diff, model, f32, step, (x, flip, t) = _fp32_and_fp16_steps()
    real = step.forward
    # a cheap non-finite step: an infinite prediction that every parameter feeds
    step.forward = lambda x_t, t: x_t * 0 + sum(p.sum() for p in step.params) * math.inf
    for k in range(99):
        step(x, flip, t, 1, 0)
    assert step.read_stats()["longest_skipped"] == 99
    assert step._scale.item() == 1.0
    step.forward = real
    f32(x, flip, t, 7, 0)
    step(x, flip, t, 7, 0)
    assert step.read_stats()["skipped_total"] == 99          # this one applied
    ga = torch.cat([p.grad.flatten() for p in f32.params])
    gb = torch.cat([p.grad.flatten() for p in step.params])
    assert (ga - gb).norm() <= 4e-3 * ga.norm()


def _autocast_and_cast_once(model, steps: int, batch: int, **kw):
    """Two bf16 TrainSteps of copies of ``model``, autocast's casts and cast_once, after
    ``steps`` steps on the same random batches of ``batch`` images (``kw``: TrainStep's)."""
    import copy
    diff = BlurDiffusion(resolution=16)
    pair = [training.TrainStep(copy.deepcopy(model), diff, device="cpu", precision="bf16",
                               cast_once=c, **kw) for c in (False, True)]
    g = torch.Generator().manual_seed(2)
    for k in range(steps):
        x = torch.randint(0, 256, (batch, 16, 16, 3), dtype=torch.uint8, generator=g)
        t = torch.randint(1, diff.num_steps, (batch,), generator=g)
        flip = torch.arange(batch) % 2 == k % 2
        for s in pair:
            s(x, flip, t, 9, batch * k)
    return pair


def test_cast_once_gives_autocasts_bits():
    # Bf16Weights against autocast's own casts: three bf16 steps from the same start give
    # the same parameters, EMA, Adam moments and counters, bit for bit. TINY has
    # convolutions, linear layers, attention and norms (float32 in both).
    torch.manual_seed(0)
    ref, new = _autocast_and_cast_once(UNet(resolution=16, **TINY), 3, 3, lr=1e-3,
                                       ema_beta=0.5)
    w = new._bf16
    assert 0 < len(w.copies) < len(new.params)          # the norms' parameters stay shared
    assert all(c.dtype == torch.bfloat16 for c in w.copies)
    assert all(p.dtype == torch.float32 for p in new.model.parameters())
    for a, b in zip([*ref.params, *ref.ema_params], [*new.params, *new.ema_params]):
        assert torch.equal(a, b)
    for a, b in zip(ref.params, new.params):
        sa, sb = ref.opt.state[a], new.opt.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert ref.read_stats() == new.read_stats()
    # the copies are their own memory, and refresh() rounds the current weights into them
    assert all(c.data_ptr() != p.data_ptr() for p, c in zip(w.masters, w.copies))
    w.refresh()
    assert all(torch.equal(c, p.to(torch.bfloat16)) for p, c in zip(w.masters, w.copies))


def test_cast_once_leaves_a_frozen_layer_as_autocast_does():
    # A frozen convolution (requires_grad False) gets no gradient, so Adam with weight
    # decay passes over it: under cast_once as under autocast, the same bits after two
    # steps, the frozen weights untouched.
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    model.input.requires_grad_(False)
    frozen = model.input.weight.detach().clone()
    ref, new = _autocast_and_cast_once(model, 2, 2, lr=1e-2, weight_decay=0.1)
    assert new.model.input.weight.grad is None
    assert torch.equal(new.model.input.weight, frozen)
    for a, b in zip([*ref.params, *ref.ema_params], [*new.params, *new.ema_params]):
        assert torch.equal(a, b)
    assert ref.read_stats() == new.read_stats()


@pytest.mark.parametrize("rounds", [2, 4])
def test_grad_accum_rounds_give_the_batchs_gradient_in_float64(rounds):
    # The gradient a step applies, with the batch in 1, 2 or 4 rounds, against the float64
    # gradient of the whole batch's loss (q_sample's x_t and eps, the same Philox noise).
    # Read before the update: Adam's moments after one step are (1 - beta1) g and
    # (1 - beta2) g^2. A round given the wrong noise, images, scale or a lost round moves
    # the gradient by far more than float32's rounding.
    import copy
    import torch.nn.functional as F
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    # The output conv (and each block's second conv) starts at zero: at initialization only
    # the output conv has a gradient (867 of 769,027 numbers). Weights moved off zero give
    # every parameter one, the norms' and the attention's included.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model).double()
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    t, flip = torch.tensor([3, 40, 400, 990]), torch.zeros(4, dtype=torch.bool)
    x_t, eps = diff.q_sample(D.to_float(x), t, seed=5, offset=0)
    loss = F.mse_loss(ref(x_t.double(), t), eps.double())
    loss.backward()
    assert all(p.grad.abs().max() > 0 for p in ref.parameters())
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    got = {}
    for k in (1, rounds):
        step = training.TrainStep(copy.deepcopy(model), diff, device="cpu", lr=1e-3,
                                  flip=False, grad_clip=None, grad_accum=k)
        step(x, flip, t, 5, 0)
        got[k] = torch.cat([step.opt.state[q]["exp_avg"].double().flatten() / 0.1
                            for q in step.params])
        assert step.read_stats()["loss"] == pytest.approx(loss.item(), rel=1e-6)
    # float32 against float64 as whole vectors: one, two and four rounds measured 1.1e-6,
    # 1.06e-6 and 1.05e-6; two and four rounds from one, 1.1e-6 and 1.5e-6
    for k, g in got.items():
        assert (g - want).norm() <= 3e-6 * want.norm(), k
    assert (got[rounds] - got[1]).norm() <= 3e-6 * want.norm()


def test_grad_accum_under_cast_once_adds_rounds_as_autocast_does():
    # bf16 rounds: cast_once's float32 master gradients add each round's widened bf16
    # gradient, as autograd adds autocast's: the same bits after two steps.
    import copy
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    steps = [training.TrainStep(copy.deepcopy(model), diff, device="cpu", lr=1e-3,
                                precision="bf16", cast_once=c, grad_accum=2)
             for c in (False, True)]
    g = torch.Generator().manual_seed(3)
    for k in range(2):
        x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        t = torch.randint(1, diff.num_steps, (4,), generator=g)
        for s in steps:
            s(x, torch.tensor([True, False, False, True]), t, 9, 0)
    ref, new = steps
    for a, b in zip([*ref.params, *ref.ema_params], [*new.params, *new.ema_params]):
        assert torch.equal(a, b)
    assert ref.read_stats() == new.read_stats()


def test_resuming_with_another_pixel_range_is_an_error_naming_both_values(made16, tmp_path):
    # A model trained on [-1, 1] pixels predicts x0 there; resumed with pixel_range "0,1"
    # it was trained on (and its samples read back from) [0, 1] with a warning only.
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=2, **KW)
    with pytest.raises(ValueError, match=r"^resume: pixel_range '0,1' differs from the "
                                         r"checkpoint's '-1,1' \("):
        training.train(data=str(made16), out=str(out), steps=3, resume="auto",
                       pixel_range="0,1", **KW)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    # A checkpoint saved without the key had the default, "-1,1": resumed with it, no error.
    d = ckpt.list_checkpoints(out / "checkpoints")[0][1]
    state = ckpt.load(d)
    old = {k: v for k, v in state["config"].items() if k != "pixel_range"}
    extra = {k: state[k] for k in state if k not in ("format", "step", "config", "path")}
    net, ema = UNet(**old["model"]), UNet(**old["model"])
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    ckpt.save(out / "checkpoints", 2, net, ema, extra, old)
    with pytest.raises(ValueError, match=r"^resume: pixel_range '0,1' differs from the "
                                         r"checkpoint's '-1,1'"):
        training.train(data=str(made16), out=str(out), steps=3, resume="auto",
                       pixel_range="0,1", **KW)
    # A harmless change (log_every) still trains on, with a warning.
    with pytest.warns(UserWarning, match="settings changed since the checkpoint: log_every "
                                         "1 -> 2"):
        training.train(data=str(made16), out=str(out), steps=3, resume="auto",
                       **{**KW, "log_every": 2})
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")][0] == 3


def test_resuming_a_checkpoint_saved_before_a_new_setting_warns_of_no_change(made16, tmp_path,
                                                                          recwarn):
    # A checkpoint of a version without grad_accum: its run had the default, so resuming
    # with the default changes no setting; resuming with another value says so.
    out = tmp_path / "run"
    training.train(data=str(made16), out=str(out), steps=2, **KW)
    d = ckpt.list_checkpoints(out / "checkpoints")[-1][1]
    state = ckpt.load(d)
    old = {k: v for k, v in state["config"].items() if k != "grad_accum"}
    extra = {k: state[k] for k in state if k not in ("format", "step", "config", "path")}
    net = UNet(**old["model"])
    ema = copy.deepcopy(net)
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    ckpt.save(out / "checkpoints", 2, net, ema, extra, old)
    # The warning names the value the old run had (the default), not None: the step-2
    # checkpoint, resumed in a copy of the run, with another value.
    shutil.copytree(out, tmp_path / "copy")
    with pytest.warns(UserWarning, match="settings changed since the checkpoint: grad_accum "
                                         "1 -> 2"):
        training.train(data=str(made16), out=str(tmp_path / "copy"), steps=3, resume="auto",
                       **{**KW, "grad_accum": 2})
    training.train(data=str(made16), out=str(out), steps=3, resume="auto", **KW)
    assert not [w for w in recwarn if "settings changed" in str(w.message)]
    with pytest.warns(UserWarning, match="settings changed since the checkpoint: grad_accum "
                                         "1 -> 2"):
        training.train(data=str(made16), out=str(out), steps=4, resume="auto",
                       **{**KW, "grad_accum": 2})


def test_fid_during_training_samples_in_batches_of_4_rounds(made16, tmp_path, monkeypatch):
    # FidMonitor's batch: 4 x the step's round (batch_size / grad_accum), at least 1.
    from blurfast import evaluation
    assert training.sampling_batch({"batch_size": 16}) == 64
    assert training.sampling_batch({"batch_size": 16, "grad_accum": 4}) == 16
    assert training.sampling_batch({"batch_size": 2, "grad_accum": 2}) == 4
    seen = {}

    class Monitor:
        def __init__(self, ref, **kw):
            seen.update(kw)
            raise ValueError("stop here")
    monkeypatch.setattr(evaluation, "FidMonitor", Monitor)
    with pytest.raises(ValueError, match="stop here"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, fid_every=1,
                       fid_ref=str(made16), **{**KW, "grad_accum": 2})
    assert seen["batch"] == 4 * KW["batch_size"] // 2


def test_activation_checkpointing_trains_the_same_weights(made16, tmp_path):
    # A run with activation checkpointing is the run without it, bit for bit on a CPU,
    # dropout included (the recomputation replays the masks). The setting is saved in
    # config.json and a resumed run keeps it.
    kw = {**KW, "model": {**TINY, "dropout": 0.2}, "save_every": 3}
    runs = {on: training.train(data=str(made16), out=str(tmp_path / f"r{on}"), steps=3,
                               activation_checkpointing=on, **kw)
            for on in (False, True)}
    assert runs[True]["model"].activation_checkpointing is True
    for name in ("model", "ema"):
        a, b = runs[False][name].state_dict(), runs[True][name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "rTrue" / "config.json").read_text())[
        "activation_checkpointing"] is True
    from blurfast.cli_train import saved_config
    assert saved_config("auto", tmp_path / "rTrue")["activation_checkpointing"] is True
    with pytest.raises(TypeError, match="^activation_checkpointing: expected a bool, got 1$"):
        training.train(data=str(made16), out=str(tmp_path / "bad"), steps=1,
                       activation_checkpointing=1, **KW)


def test_grad_accum_must_divide_the_batch(made16, tmp_path):
    with pytest.raises(ValueError, match="grad_accum: 3 rounds do not divide batch_size 4"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "grad_accum": 3})
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="grad_accum: expected an int >= 1, got 0"):
        training.TrainStep(UNet(resolution=16, **TINY), BlurDiffusion(resolution=16),
                           device="cpu", grad_accum=0)


@pytest.mark.parametrize("kw", [dict(precision="fp32"), dict(precision="bf16", ddp=True)])
def test_cast_once_needs_bf16_and_one_process(kw):
    diff = BlurDiffusion(resolution=16)
    with pytest.raises(ValueError, match="cast_once: needs precision='bf16'"):
        training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", cast_once=True,
                           **kw)


@pytest.mark.parametrize("grad_clip, max_norm", [(None, float("inf")), (0, float("inf")),
                                                  (0.0, float("inf")), (0.5, 0.5),
                                                  (np.float32(2), 2.0), (3, 3.0)])
def test_step_takes_grad_clip_none_or_0_for_no_clipping(grad_clip, max_norm):
    step = training.TrainStep(UNet(resolution=16, **TINY), BlurDiffusion(resolution=16),
                              device="cpu", grad_clip=grad_clip)
    assert step.max_norm == max_norm and type(step.max_norm) is float


@pytest.mark.parametrize("grad_clip", [-1, -1e-9, float("nan"), float("inf"), True, "1",
                                       [1.0]])
def test_step_refuses_a_bad_grad_clip(grad_clip):
    with pytest.raises(ValueError, match=r"^grad_clip: expected a finite number >= 0 or None, "
                                         r"got "):
        training.TrainStep(UNet(resolution=16, **TINY), BlurDiffusion(resolution=16),
                           device="cpu", grad_clip=grad_clip)


def _step_setup():
    """The short TrainStep tests' setup: ``(diff, x, t, flip)``, a 16 x 16 BlurDiffusion
    and one batch of two uint8 images (a fixed seed), their steps and flips (none)."""
    diff = BlurDiffusion(resolution=16)
    x = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(3))
    return diff, x, torch.tensor([5, 50]), torch.zeros(2, dtype=torch.bool)


def test_resumed_step_keeps_its_own_optimizer_settings():
    # Optimizer.load_state_dict restores the saved groups' settings; a resumed run's own
    # betas, eps, weight decay and capturable (CUDA graphs or not) must win.
    diff, x, t, flip = _step_setup()
    torch.manual_seed(0)
    old = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=1e-3,
                             betas=(0.9, 0.99), adam_eps=1e-8, weight_decay=0.0)
    old(x, flip, t, 1, 0)
    state = old.state_dict()
    state["optimizer"]["param_groups"][0]["capturable"] = True     # as saved by a graphed run
    new = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=1e-3,
                             betas=(0.8, 0.999), adam_eps=1e-6, weight_decay=0.01)
    new.load_state_dict(state, old.model.state_dict(), old.ema.state_dict())
    g = new.opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"], g["capturable"]) == \
        ((0.8, 0.999), 1e-6, 0.01, False)
    assert torch.equal(new.opt.state[new.params[0]]["exp_avg"],
                       old.opt.state[old.params[0]]["exp_avg"])       # the moments are kept


@pytest.mark.parametrize("saved, resumed", [("adamw", "adam"), ("adam", "adamw")])
def test_resumed_step_takes_its_own_optimizers_weight_decay(saved, resumed):
    # Adam's L2 weight decay or AdamW's decoupled one is the resumed run's optimizer's,
    # whichever optimizer saved the moments: the truth is a step from a state that this
    # optimizer saved itself (the same moments, its own group flag).
    diff, x, t, flip = _step_setup()

    def stepper(optimizer):
        torch.manual_seed(0)
        return training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=1e-2,
                                  optimizer=optimizer, weight_decay=0.5)
    old = stepper(saved)
    old(x, flip, t, 1, 0)
    state = old.state_dict()
    own = copy.deepcopy(state)
    own["optimizer"]["param_groups"][0]["decoupled_weight_decay"] = resumed == "adamw"
    got, want = stepper(resumed), stepper(resumed)
    got.load_state_dict(state, old.model.state_dict(), old.ema.state_dict())
    want.load_state_dict(own, old.model.state_dict(), old.ema.state_dict())
    for s in (got, want):
        s(x, flip, t, 2, 0)
    for p, q in zip(got.params, want.params):
        assert torch.equal(p, q)


def test_ema_halflife_kimg_is_in_thousands_of_images(made16, tmp_path):
    # ema_halflife_kimg = h: the EMA's weight halves every 1000 h images, so a step of B
    # images has beta = 0.5 ** (B / (1000 h)). h = 0.004 with B = 4: beta = 0.5, and after
    # one step ema = p0 + (1 - beta) (p1 - p0) with p0 the initial and p1 the trained weights.
    res = training.train(data=str(made16), out=str(tmp_path / "run"), steps=1,
                         **{**KW, "ema_decay": None, "ema_halflife_kimg": 0.004})
    torch.manual_seed(KW_SEED)
    p0 = UNet(**res["model"].config).state_dict()
    p1, ema = res["model"].state_dict(), res["ema"].state_dict()
    moved = 0.0
    for k, e in ema.items():
        want = p0[k].double() + 0.5 * (p1[k].double() - p0[k].double())
        # one float32 lerp: measured error 0 (|p| <= 1); another beta is off by
        # |beta - 0.5| |p1 - p0|, with |p1 - p0| up to lr = 1e-3 (Adam's first step)
        torch.testing.assert_close(e.double(), want, rtol=1e-6, atol=1e-7, msg=k)
        moved = max(moved, (p1[k] - p0[k]).abs().max().item())
    assert moved > 5e-4                                  # the step did move the weights


def test_warmup_ramps_lr_from_lr_over_warmup_at_the_first_step(made16, tmp_path, monkeypatch):
    # warmup = 4: the optimizer steps s = 1, 2, 3, ... use lr * min(1, s / 4), so the first
    # step already uses lr / 4 (never 0) and lr is reached at step 4; log.csv's row of step
    # s shows the lr that step used.
    used = []
    real = training.TrainStep._body

    def spy(self, *a):
        used.append(self.opt.param_groups[0]["lr"])
        return real(self, *a)

    monkeypatch.setattr(training.TrainStep, "_body", spy)
    lr = KW["lr"]
    training.train(data=str(made16), out=str(tmp_path / "run"), steps=6,
                   **{**KW, "warmup": 4, "save_every": 1000})
    want = [lr * s / 4 for s in (1, 2, 3, 4)] + [lr, lr]
    assert used == pytest.approx(want, rel=1e-12)
    rows = [dict(zip(training.LOG_FIELDS, r.split(",")))
            for r in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["lr"]) for r in rows] == pytest.approx(want, rel=1e-6)   # "%.6g"


def test_flat_parameters_keep_values_and_strides():
    torch.manual_seed(0)
    m = UNet(resolution=16, **TINY).to(memory_format=torch.channels_last)
    before = [(p.detach().clone(), p.stride()) for p in m.parameters()]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    y = m(x, t)
    flat = training.flatten_params_(m)
    assert flat is not None and flat.numel() >= sum(p.numel() for p in m.parameters())
    for p, (v, stride) in zip(m.parameters(), before):
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.stride() == stride and torch.equal(p, v)
        assert (p.data_ptr() - flat.data_ptr()) % 512 == 0
    assert torch.equal(m(x, t), y)
    with torch.no_grad():                     # the buffer and the parameters are one
        flat.mul_(2)
    assert all(torch.equal(p, 2 * v) for p, (v, _) in zip(m.parameters(), before))
    assert flat.count_nonzero() == sum(int(v.count_nonzero()) for v, _ in before)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    assert training.flatten_params_(mixed) is None


# ------------------------------------------------------------------------ non-finite

def test_ema_update_formula_and_no_host_read():
    # ema += w (p - ema) with w a 0-dim tensor. On the meta device any read of w's value
    # fails, so this also shows the update never reads it back to the host (a sync that
    # CUDA-graph capture of the training step forbids).
    g = torch.Generator().manual_seed(0)
    params, ema = ([torch.randn(*shape, generator=g, dtype=torch.float64)
                    for shape in ((3, 4), (5,))] for _ in range(2))
    want = [e + 0.3 * (p - e) for e, p in zip(ema, params)]
    training.ema_update_(ema, params, torch.tensor(0.3, dtype=torch.float64))
    for e, w in zip(ema, want):
        assert torch.allclose(e, w, rtol=0, atol=1e-15)
    meta = [t.to("meta") for t in ema]
    training.ema_update_(meta, [t.to("meta") for t in params], torch.tensor(0.3, device="meta"))


def test_flip_false_ignores_the_drawn_flips_and_flip_true_mirrors_those_images():
    # flip=True: an image drawn with flip True trains as its mirror image (the uint8 batch
    # mirrored here by hand, along W); flip=False (--no-flip): the flips drawn are ignored.
    # One step each from the same weights, steps and noise: the same weights after, to the
    # bit, wherever the model saw the same images.
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 40, 400, 990])
    some, none = torch.tensor([True, False, True, False]), torch.zeros(4, dtype=torch.bool)
    mirrored = torch.where(some[:, None, None, None], x.flip(2), x)

    def weights_after(flip_on, images, flips):
        step = training.TrainStep(copy.deepcopy(model), diff, device="cpu", lr=1e-3,
                                  flip=flip_on)
        step(images, flips, t, 5, 0)
        return [p.detach().clone() for p in step.params]

    def same(u, v):
        return all(torch.equal(a, b) for a, b in zip(u, v))
    plain = weights_after(False, x, none)
    assert same(weights_after(False, x, some), plain)
    flipped = weights_after(True, x, some)
    assert same(flipped, weights_after(True, mirrored, none))
    assert not same(flipped, plain)                       # the mirror images did differ


def test_a_skipped_step_changes_nothing():
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    step = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=1e-3,
                              ema_beta=0.5)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    t, flip = torch.tensor([5, 50, 500, 900]), torch.tensor([True, False, True, False])
    step(x, flip, t, 1, 0)
    before = ([p.clone() for p in step.params], [p.clone() for p in step.ema_params],
              [v.clone() for s in step.opt.state.values() for v in s.values()])
    real = step.model.forward
    step.model.forward = lambda x, t: real(x, t) * float("nan")
    step(x, flip, t, 2, 0)
    after = (step.params, step.ema_params,
             [v for s in step.opt.state.values() for v in s.values()])
    for a, b in zip(before, after):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    st = step.read_stats()
    assert st["skipped_total"] == 1 and st["consecutive_skipped"] == 1
    assert np.isfinite(st["loss"])                        # the mean of the finite step
    step.model.forward = real
    step(x, flip, t, 3, 0)
    assert not all(torch.equal(u, v) for u, v in zip(before[0], step.params))
    st = step.read_stats()
    assert st["skipped_total"] == 1 and st["consecutive_skipped"] == 0


def _float64_loss_and_norm(ref, diff, x, t, seed):
    """The eps loss of one TrainStep call (uint8 batch x, steps t, noise seed) and its
    gradient norm, in float64 on ``ref``, a float64 copy of the weights the step starts
    from (unflipped, noise offset 0)."""
    import torch.nn.functional as F
    x_t, eps = diff.q_sample(D.to_float(x), t, seed=seed, offset=0)
    loss = F.mse_loss(ref(x_t.double(), t), eps.double())
    loss.backward()
    norm = torch.stack([p.grad.pow(2).sum() for p in ref.parameters()]).sum().sqrt()
    return loss.item(), norm.item()


def test_logged_means_leave_a_skipped_step_out():
    # One finite step, then one with a NaN loss (and gradient): read_stats' loss and grad
    # norm are those of the finite step alone, not halved by counting the skipped one.
    # The truth: the step's loss and gradient norm in float64, from q_sample's x_t and eps.
    import copy
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    ref = copy.deepcopy(model).double()
    step = training.TrainStep(model, diff, device="cpu", lr=1e-3, flip=False)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    t, flip = torch.tensor([3, 40, 400, 990]), torch.zeros(4, dtype=torch.bool)
    step(x, flip, t, 5, 0)
    real = step.model.forward
    step.model.forward = lambda x, t: real(x, t) * float("nan")
    step(x, flip, t, 6, 0)
    st = step.read_stats()
    assert st["skipped_total"] == 1

    loss, norm = _float64_loss_and_norm(ref, diff, x, t, seed=5)
    # float32 step against float64: measured rel. error 2e-8 (loss), 2e-7 (norm), bounds
    # 50x that; a skipped step counted in the means would halve them
    assert st["loss"] == pytest.approx(loss, rel=1e-6)
    assert st["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_non_finite_steps_are_counted_then_stop_the_run(made16, tmp_path, monkeypatch):
    real = UNet.forward
    calls = []

    def sometimes_nan(self, x, t):
        calls.append(1)
        y = real(self, x, t)
        return y * float("nan") if len(calls) in (2, 3) else y

    monkeypatch.setattr(UNet, "forward", sometimes_nan)
    res = training.train(data=str(made16), out=str(tmp_path / "a"), steps=5,
                         **{**KW, "sample_every": 1000, "sample_count": 1, "sample_steps": 1})
    assert res["skipped"] == 2 and res["step"] == 5
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())

    assert (tmp_path / "a" / "curves.png").is_file()      # log.csv with nan losses

    monkeypatch.setattr(UNet, "forward", lambda self, x, t: real(self, x, t) * float("nan"))
    with pytest.raises(training.NonFiniteError, match="non-finite in 3 consecutive steps"):
        training.train(data=str(made16), out=str(tmp_path / "b"), steps=50,
                       **{**KW, "max_nonfinite": 3})


def test_a_non_finite_run_that_ends_between_log_points_still_stops_the_run(made16, tmp_path,
                                                                           monkeypatch):
    # Steps 2..8 non-finite (7 in a row, max_nonfinite 3), step 9 and 10 finite: the log
    # point at step 10 sees the run of 7 although the count in a row is 0 again there.
    real = UNet.forward
    calls = []

    def nan_2_to_8(self, x, t):
        calls.append(1)
        y = real(self, x, t)
        return y * float("nan") if 2 <= len(calls) <= 8 else y

    monkeypatch.setattr(UNet, "forward", nan_2_to_8)
    with pytest.raises(training.NonFiniteError,
                       match=r"non-finite in 7 consecutive steps \(by step 10\)"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=10,
                       **{**KW, "log_every": 10, "save_every": 100, "max_nonfinite": 3})
    # A checkpoint saved with the six counters of earlier versions still loads.
    step = training.TrainStep(UNet(resolution=16, **TINY), BlurDiffusion(resolution=16),
                              device="cpu")
    state = step.state_dict()
    state["stats"] = torch.arange(6, dtype=torch.float64)
    step.load_state_dict(state, step.model.state_dict(), step.ema.state_dict())
    assert step.read_stats()["skipped_total"] == 3 and step.read_stats()["longest_skipped"] == 0


def test_sample_grids_of_a_short_chain(made16, tmp_path):
    # --sample-steps (default 100) beyond the chain's N - 1 = 19 calls: the grid takes 19.
    res = training.train(data=str(made16), out=str(tmp_path / "r"), steps=2,
                         diffusion=dict(num_steps=20),
                         **{**KW, "sample_every": 2, "sample_steps": 100})
    assert res["step"] == 2 and (tmp_path / "r" / "samples" / "step_000000002.png").is_file()


def test_numpy_scalars_are_taken_as_python_numbers(made16, tmp_path):
    # check_number takes numpy's scalars; the run must store them as JSON numbers.
    np_kw = dict(lr=np.float32(1e-3), betas=(np.float32(0.9), np.float64(0.999)),
                 weight_decay=np.float32(0), grad_clip=np.float32(1), ema_decay=np.float32(0.9))
    training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, **{**KW, **np_kw})
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["lr"] == float(np.float32(1e-3)) and cfg["betas"] == [float(np.float32(0.9)), 0.999]
    assert cfg["ema_decay"] == float(np.float32(0.9)) and cfg["grad_clip"] == 1.0


def test_a_saved_configs_model_and_diffusion_train_a_run_of_the_same_model(reference_run,
                                                                           made16, tmp_path):
    # A checkpoint's config["model"] and config["diffusion"] hold the resolution and channels
    # (UNet's arguments too): given to train() as they are, they name the same run (the
    # model's were passed twice to from_preset, a TypeError naming neither).
    _, _, config = ckpt.load_model(reference_run["checkpoint"])
    res = training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, **{
        **KW, "model": config["model"], "diffusion": config["diffusion"]})
    assert res["model"].config == config["model"]


@pytest.mark.parametrize("compile", [True, False])
def test_compiling_runs_say_the_first_steps_compile(made16, tmp_path, capsys, monkeypatch,
                                                    compile):
    # Compiling (train()'s default on one GPU) stalls the bar for minutes: the run says so
    # before it starts. torch.compile is stubbed out: only the message is under test.
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                   **{**KW, "compile": compile, "progress": True})
    said = "compile: the first steps compile the model" in capsys.readouterr().out
    assert said is compile


@pytest.mark.parametrize("slowed", ["sample", "training_curves"])
def test_sample_grids_show_progress_and_stay_out_of_images_per_s(made16, tmp_path, capsys,
                                                                monkeypatch, slowed):
    # A grid drawn mid-run shows a bar of its own, and log.csv's images_per_s of the next
    # interval counts the training alone: the grid, and curves.png redrawn with it (one
    # slowed by 1.5 s here), are left out.
    from blurfast import sampling, viz
    module = sampling if slowed == "sample" else viz
    real, pause = getattr(module, slowed), 1.5

    def slow(*a, **k):
        time.sleep(pause)
        return real(*a, **k)

    monkeypatch.setattr(module, slowed, slow)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)      # bars: on a terminal only
    out = tmp_path / "r"
    training.train(data=str(made16), out=str(out), steps=3, **{
        **KW, "sample_every": 2, "save_every": 1000, "progress": True})
    assert "sample grid step_000000002.png (4 images)" in capsys.readouterr().err
    rows = (out / "log.csv").read_text().splitlines()[1:]
    step3 = dict(zip(training.LOG_FIELDS, rows[2].split(",")))
    step2 = dict(zip(training.LOG_FIELDS, rows[1].split(",")))
    wall = float(step3["elapsed_s"]) - float(step2["elapsed_s"])       # grid included
    trained = KW["batch_size"] / float(step3["images_per_s"])          # seconds of step 3
    assert wall > pause and trained < wall - pause + 0.2, (wall, trained)


def test_curves_that_cannot_be_drawn_warn_once_and_the_run_goes_on(made16, tmp_path,
                                                                  monkeypatch):
    from blurfast import viz
    calls = []

    def no_matplotlib(run_dir):
        calls.append(run_dir)
        raise ImportError("training_curves needs matplotlib: pip install matplotlib")

    monkeypatch.setattr(viz, "training_curves", no_matplotlib)
    with pytest.warns(UserWarning, match="curves.png: not drawn .*matplotlib") as got:
        res = training.train(data=str(made16), out=str(tmp_path / "r"), steps=4,
                             **{**KW, "sample_every": 2})
    assert res["step"] == 4 and len(calls) == 1
    assert sum("curves.png" in str(w.message) for w in got) == 1


# ------------------------------------------------------------------------ signals, CLI

def _parser():
    p = argparse.ArgumentParser(prog="blurfast")
    cli_train.register(p.add_subparsers(dest="command"))
    return p


def test_a_signal_while_the_last_step_is_drawn_ends_the_run_as_signalled(made16, tmp_path,
                                                                        monkeypatch):
    # One process: SIGTERM after the last log point, while the last grid is drawn. The
    # run is saved at its last step and ends as a signalled run (as every rank under
    # torchrun does), not as a run that finished unsignalled.
    import os as _os
    draw = training._save_samples

    def signalled(*a, **k):
        _os.kill(_os.getpid(), signal.SIGTERM)
        return draw(*a, **k)
    monkeypatch.setattr(training, "_save_samples", signalled)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    r = training.train(data=str(made16), out=str(out), steps=2,
                       **{**KW, "sample_every": 2, "save_every": 1000})
    assert r["stopped_by"] == "SIGTERM" and r["step"] == 2
    assert r["checkpoint"] == str(out / "checkpoints" / "step_000000002")
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGTERM) == before        # the handler given back


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c", "sigterm_group"])
def test_a_signal_saves_a_checkpoint_and_exits(made16, tmp_path, how):
    # SIGTERM to the process; or a terminal's Ctrl-C: SIGINT to the whole process group,
    # the DataLoader's workers too, while the run waits on them (loading slower than a
    # step); or SIGTERM to the whole group so (as a batch system's preemption sends it).
    # The run saves and exits either way.
    out = tmp_path / "run"
    group = how != "sigterm"
    workers = ["--num-workers", "2"] if group else []
    p = _child(f"""
        import argparse, sys, time, torch
        torch.set_num_threads(1)
        from blurfast import cli_train, data
        if {group!r}:
            get = data.PreparedArray.__getitems__
            data.PreparedArray.__getitems__ = lambda self, i: (time.sleep(0.3), get(self, i))[1]
        ap = argparse.ArgumentParser()
        cli_train.register(ap.add_subparsers())
        a = ap.parse_args(["train", "--data", {str(made16)!r}, "--out", {str(out)!r},
                           "--resolution", "16", "--batch-size", "2", "--steps", "100000",
                           "--base-channels", "32", "--channel-mult", "1", "2",
                           "--num-res-blocks", "1", "--log-every", "1", "--save-every",
                           "100000", "--no-progress", "--device", "cpu", *{workers!r}])
        sys.exit(a.func(a))
    """, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "log.csv"
        if log.is_file() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    sig = signal.SIGINT if how == "ctrl_c" else signal.SIGTERM
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, text
    assert f"{sig.name}: stopping after this step, which is saved" in text
    assert f"{sig.name}: saved" in text
    assert f"continue with resume='auto' (blurfast train --out {out} --resume auto)" in text
    (step, path), = ckpt.list_checkpoints(out / "checkpoints")
    assert step >= 3 and ckpt.load(path)["step"] == step


def test_a_second_process_cannot_train_into_a_run_in_progress(made16, tmp_path):
    # While one process trains into RUN_DIR, another (here this one) is refused, naming
    # the directory and the holder, and writes nothing there.
    out = tmp_path / "run"
    p = _child(f"""
        import torch
        torch.set_num_threads(1)
        from blurfast import training
        training.train(data={str(made16)!r}, out={str(out)!r}, steps=100000,
                       **{{**{KW!r}, "save_every": 100000}})
    """)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) > 2):
            assert p.poll() is None, p.communicate()[0]
            time.sleep(0.2)
        config = (out / "config.json").read_text()
        with pytest.raises(ValueError, match=f"^out: {out} is in use by another training "
                                             rf"process \(pid {p.pid}\); wait for it"):
            training.train(data=str(made16), out=str(out), steps=3, resume="auto",
                           **{**KW, "lr": 0.5})
        assert (out / "config.json").read_text() == config
    finally:
        p.send_signal(signal.SIGTERM)
        text, _ = p.communicate(timeout=120)
    assert p.returncode == 0, text
    res = training.train(data=str(made16), out=str(out), steps=ckpt.list_checkpoints(
        out / "checkpoints")[0][0] + 1, resume="auto", **{**KW, "save_every": 100000})
    assert res["steps_run"] == 1                 # the lock was released: the run goes on


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(made16, tmp_path,
                                                                     monkeypatch):
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="out: cannot lock .*No locks available"):
        res = training.train(data=str(made16), out=str(tmp_path / "r"), steps=2, **KW)
    assert res["steps_run"] == 2


def test_sigterm_during_prepare_leaves_no_file(tmp_path):
    # The child sends itself SIGTERM while decoding its fifth image: the command exits
    # 143 and neither the array nor its temporary file is left.
    src = made_photos(tmp_path / "src", 12, size=16)
    p = _child(f"""
        import os, signal, sys
        from blurfast import cli, data
        real, calls = data.decode, []
        def decode(*a, **k):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        data.decode = decode
        sys.exit(cli.main(["prepare", {str(src)!r}, {str(tmp_path / "out.npy")!r},
                           "--resolution", "16", "--workers", "0", "--no-progress"]))
    """)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, log
    assert sorted(f.name for f in tmp_path.iterdir()) == ["src"]


def test_cli_config_file_and_flags(made16, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(f"""
        data: {made16}
        resolution: 16
        batch_size: 2
        steps: 2
        lr: 2e-3
        adam_eps: 1E-7
        model: {{base_channels: 32, channel_mult: [1, 2], num_res_blocks: 1}}
        diffusion: {{blur_schedule: cubic, sigma_max: 0.2}}
        sample_count: 1
        sample_steps: 1
    """))
    a = _parser().parse_args(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                              "--sigma-max", "0.1", "--ema-halflife-kimg", "0.5",
                              "--grad-clip", "none", "--no-flip", "--no-progress",
                              "--device", "cpu"])
    kw = cli_train.train_kwargs(a)
    assert kw["diffusion"] == {"blur_schedule": "cubic", "sigma_max": 0.1}
    # 2e-3 is a float, though YAML 1.1 (PyYAML) would read it as a string
    assert kw["lr"] == 0.002 and kw["adam_eps"] == 1e-7
    assert kw["ema_decay"] is None and kw["ema_halflife_kimg"] == 0.5
    assert kw["grad_clip"] is None and kw["flip"] is False
    assert kw["model"]["channel_mult"] == (1, 2)
    assert a.func(a) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["diffusion"]["sigma_max"] == 0.1 and saved["diffusion"]["blur_schedule"] == "cubic"
    assert saved["ema_halflife_kimg"] == 0.5 and saved["grad_clip"] is None

    (tmp_path / "bad.json").write_text(json.dumps({"data": "x", "lr_typo": 1}))
    a = _parser().parse_args(["train", "--config", str(tmp_path / "bad.json"), "--out", "o"])
    with pytest.raises(ValueError, match="lr_typo"):
        cli_train.train_kwargs(a)
    a = _parser().parse_args(["train", "--out", str(tmp_path / "o"), "--data",
                              str(made16), "--steps", "0"])
    assert a.func(a) == 2                                 # ValueError -> exit code 2


def test_cli_resume_starts_from_the_saved_run(made16, tmp_path, capsys):
    # A resumed run's arguments: the saved run's, then the --config file's, then the flags
    # given; argparse's defaults (resolution 64, lr 5e-5, ...) never replace saved values.
    out = tmp_path / "r"
    first = ["train", "--data", str(made16), "--out", str(out), "--resolution", "16",
             "--batch-size", "2", "--steps", "2", "--lr", "2e-3", "--base-channels", "32",
             "--channel-mult", "1", "2", "--num-res-blocks", "1", "--sigma-max", "0.2",
             "--ema-halflife-kimg", "0.5", "--log-every", "1", "--sample-count", "1",
             "--sample-steps", "1", "--no-progress", "--device", "cpu"]
    a = _parser().parse_args(first)
    assert a.func(a) == 0
    saved = json.loads((out / "config.json").read_text())

    def kwargs(*argv):
        return cli_train.train_kwargs(_parser().parse_args(["train", "--out", str(out), *argv]))

    kw = kwargs("--resume", "auto", "--steps", "3")
    assert (kw["data"], kw["resolution"], kw["batch_size"], kw["lr"], kw["steps"]) == \
        (str(made16), 16, 2, 0.002, 3)
    assert kw["model"] == {"base_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
                           "attention_resolutions": (8,), "num_heads": 4, "dropout": 0.0,
                           "freq_input": False, "emb_act": True}
    assert kw["diffusion"]["sigma_max"] == 0.2 and "resolution" not in kw["diffusion"]
    assert (kw["ema_decay"], kw["ema_halflife_kimg"]) == (None, 0.5)
    assert "device" not in kw and "precision" not in kw        # this machine's defaults
    # compile too: saved as resolved, on from a single-GPU run
    (out / "config.json").write_text(json.dumps({**saved, "compile": True,
                                                 "cuda_graphs": True}))
    assert "compile" not in kwargs("--resume", "auto") and "cuda_graphs" not in kwargs(
        "--resume", "auto")
    assert kwargs("--resume", "auto", "--no-compile")["compile"] is False
    (out / "config.json").write_text(json.dumps(saved))
    kw = kwargs("--resume", "auto", "--lr", "1e-3", "--ema-decay", "0.9")
    assert (kw["lr"], kw["ema_decay"], kw["ema_halflife_kimg"]) == (0.001, 0.9, None)
    (tmp_path / "c.yaml").write_text("lr: 5.0e-4\nbatch_size: 4\n")
    kw = kwargs("--resume", "auto", "--config", str(tmp_path / "c.yaml"), "--batch-size", "1")
    assert (kw["lr"], kw["batch_size"], kw["resolution"]) == (0.0005, 1, 16)
    step2 = out / "checkpoints" / "step_000000002"
    kw = cli_train.train_kwargs(_parser().parse_args(
        ["train", "--out", str(tmp_path / "fork"), "--resume", str(step2)]))
    assert (kw["data"], kw["resolution"], kw["steps"]) == (str(made16), 16, 2)
    assert "resolution" not in kw["model"]

    capsys.readouterr()
    a = _parser().parse_args(["train", "--out", str(out), "--resume", "auto", "--steps", "3"])
    assert a.func(a) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [3, 2]
    now = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in now.items() if k not in ("resume", "steps")} == \
        {k: v for k, v in saved.items() if k not in ("resume", "steps")}

    # Explicit values the checkpoint cannot take: the differing keys alone, both values.
    a = _parser().parse_args(["train", "--out", str(out), "--resume", "auto", "--steps", "4",
                              "--base-channels", "64", "--sigma-max", "0.3"])
    assert a.func(a) == 2
    err = capsys.readouterr().err
    assert "model.base_channels 64 differs from the checkpoint's 32" in err
    assert "diffusion.sigma_max 0.3 differs from the checkpoint's 0.2" in err
    assert "num_res_blocks" not in err and "blur_schedule" not in err

    # At its final step already: a line saying so, exit code 0, nothing trained.
    a = _parser().parse_args(["train", "--out", str(out), "--resume", "auto"])
    assert a.func(a) == 0
    text = capsys.readouterr().out
    assert f"{out}: already at its final step 3" in text and "done:" not in text
    res = training.train(data=str(made16), out=str(out), resume="auto", steps=3, **{
        **KW, "batch_size": 2, "lr": 2e-3, "diffusion": {"sigma_max": 0.2}})
    assert res["steps_run"] == 0 and res["step"] == 3
    assert res["checkpoint"] == str(out / "checkpoints" / "step_000000003")
    ema, _, _ = ckpt.load_model(out / "checkpoints" / "step_000000003")
    _same_weights(res["ema"], ema)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [3, 2]


def test_a_saved_configs_default_grid_sizes_are_defaulted_anew_on_another_device(made16,
                                                                                tmp_path):
    # A CPU trial's config.json reused with --config on a GPU kept the CPU's small sample
    # grids (16 images of 25 steps), resolved before the config was saved: sizes equal to
    # the saved device's defaults are now defaulted anew, as the machine keys are.
    from blurfast.training import SAMPLE_GRID, SAMPLE_GRID_CPU
    old = tmp_path / "old"
    training.train(data=str(made16), out=str(old), steps=1,
                   **{**KW, "sample_count": None, "sample_steps": None})
    saved = json.loads((old / "config.json").read_text())
    assert (saved["device"], saved["sample_count"], saved["sample_steps"]) == \
        ("cpu", *SAMPLE_GRID_CPU) == ("cpu", 16, 25)

    def kwargs(cfg, *argv):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(cfg))
        return cli_train.train_kwargs(_parser().parse_args(
            ["train", "--config", str(path), "--out", str(tmp_path / "new"), *argv]))
    kw = kwargs(saved)
    assert "sample_count" not in kw and "sample_steps" not in kw
    assert kwargs(saved, "--sample-count", "16")["sample_count"] == 16     # a flag stands
    # Other sizes are the run's own; a GPU run's defaults are dropped the same way.
    kw = kwargs({**saved, "sample_count": 9})
    assert kw["sample_count"] == 9 and "sample_steps" not in kw
    assert SAMPLE_GRID == (64, 100)
    kw = kwargs({**saved, "device": "cuda", "sample_count": 64, "sample_steps": 25})
    assert "sample_count" not in kw and kw["sample_steps"] == 25
    # Resumed on the same device, the run draws the grids it drew.
    a = _parser().parse_args(["train", "--resume", "auto", "--out", str(old), "--steps", "2",
                              "--no-progress"])
    assert a.func(a) == 0
    again = json.loads((old / "config.json").read_text())
    assert again["steps"] == 2
    assert (again["sample_count"], again["sample_steps"]) == (16, 25)


def test_cli_config_json_of_a_run_starts_a_new_run_with_its_settings(made16, tmp_path, capsys,
                                                                   monkeypatch):
    # A run's RUN_DIR/config.json given back as --config: its derived keys (world_size,
    # global_batch, the resolution and channels of model and diffusion), its machine keys
    # (defaulted anew), its resume and its out (--out names the new run) are dropped; the
    # rest are the run's train() arguments, and the new run saves the same config.
    import inspect
    import warnings
    old = tmp_path / "old"
    training.train(data=str(made16), out=str(old), steps=1, **{
        **KW, "ema_decay": None, "ema_halflife_kimg": 0.5, "grad_clip": None,
        "diffusion": {"sigma_max": 0.2}})
    saved = json.loads((old / "config.json").read_text())
    cfg = str(old / "config.json")

    def kwargs(*argv):
        return cli_train.train_kwargs(_parser().parse_args(["train", "--config", cfg, *argv]))
    new = tmp_path / "new"
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the same global batch: no warning
        kw = kwargs("--out", str(new))
    args = set(inspect.signature(training.train).parameters)
    want = {k: v for k, v in saved.items()
            if k in args and k not in ("resume", *cli_train.MACHINE_KEYS)}
    want.update(out=str(new),
                model={k: tuple(v) if isinstance(v, list) else v
                       for k, v in saved["model"].items() if k not in ("resolution", "channels")},
                diffusion={k: v for k, v in saved["diffusion"].items()
                           if k not in ("resolution", "channels")})
    assert kw == want
    a = _parser().parse_args(["train", "--config", cfg, "--out", str(new), "--steps", "2",
                              "--device", "cpu"])
    assert a.func(a) == 0
    again = json.loads((new / "config.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("out", "steps")} == \
        {k: v for k, v in saved.items() if k not in ("out", "steps")}
    # Machine keys and everything else given as flags override the file's.
    kw = kwargs("--out", str(new), "--device", "cpu", "--num-workers", "0", "--lr", "1e-3")
    assert (kw["device"], kw["num_workers"], kw["lr"]) == ("cpu", 0, 0.001)

    # Without --out: the file's out, a run that exists, is refused, unless resumed.
    capsys.readouterr()
    a = _parser().parse_args(["train", "--config", cfg, "--device", "cpu"])
    assert a.func(a) == 2
    assert f"is the saved config of the run {str(old)!r}, which exists; give --out" in \
        capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(old / "checkpoints")] == [1]
    assert kwargs("--resume", "auto")["out"] == str(old)

    # Another number of processes: a warning saying how the global batch changes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"global batch is 4 x 2 processes = 8, where the "
                                         r"saved run .* had 4; give --batch-size 2"):
        assert kwargs("--out", str(new))["batch_size"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a --batch-size given: as asked, silently
        assert kwargs("--out", str(new), "--batch-size", "2")["batch_size"] == 2
    monkeypatch.delenv("WORLD_SIZE")

    # An edited config.json: a typo is still an unknown key; derived keys that disagree
    # with what they derive from are named.
    edited = tmp_path / "edited.json"
    for change, msg in (({"lr_typo": 1}, r"unknown keys \['lr_typo'\]"),
                        ({"global_batch": 64}, r"global_batch 64 differs from its batch_size "
                                               r"4 x world_size 1"),
                        ({"resolution": 32}, r"model\.resolution 16 differs from resolution 32"),
                        ({"diffusion": {**saved["diffusion"], "channels": 1}},
                         r"diffusion\.channels 1 differs from channels 3")):
        edited.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ValueError, match=msg):
            cli_train.train_kwargs(_parser().parse_args(
                ["train", "--config", str(edited), "--out", str(new)]))
    # An edited batch_size: the error says how to go on, and that way works (it said "set
    # batch_size (or --batch-size) instead", which the edit had done).
    edited.write_text(json.dumps({**saved, "batch_size": 8}))
    with pytest.raises(ValueError, match=r"global_batch 4 differs from its batch_size 8 x "
                                         r"world_size 1; .*make them agree, or leave the "
                                         r"file as saved and give --batch-size$"):
        cli_train.train_kwargs(_parser().parse_args(
            ["train", "--config", str(edited), "--out", str(new)]))
    assert cli_train.train_kwargs(_parser().parse_args(
        ["train", "--config", cfg, "--out", str(new), "--batch-size", "8"]))["batch_size"] == 8
    # A config.json saved before emb_act existed is read as resume reads it: without it.
    edited.write_text(json.dumps({**saved, "model": {k: v for k, v in saved["model"].items()
                                                     if k != "emb_act"}}))
    kw = cli_train.train_kwargs(_parser().parse_args(
        ["train", "--config", str(edited), "--out", str(new)]))
    assert kw["model"]["emb_act"] is False
    # An edited file without the top-level resolution: the model's and diffusion's own (16)
    # stand for it, with or without --resolution 16 (train()'s default, 64, refused both);
    # groups that disagree are named.
    edited.write_text(json.dumps({k: v for k, v in saved.items() if k != "resolution"}))
    for flags in ([], ["--resolution", "16"]):
        kw = cli_train.train_kwargs(_parser().parse_args(
            ["train", "--config", str(edited), "--out", str(new), *flags]))
        assert kw["resolution"] == 16 and "resolution" not in kw["model"]
    edited.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "resolution"},
                                  "diffusion": {**saved["diffusion"], "resolution": 32}}))
    with pytest.raises(ValueError, match=r"model\.resolution 16 and diffusion\.resolution 32 "
                                         r"differ, and the file has no top-level resolution"):
        cli_train.train_kwargs(_parser().parse_args(
            ["train", "--config", str(edited), "--out", str(new)]))


def test_cli_config_json_of_a_run_names_its_run_from_another_directory(made16, tmp_path,
                                                                        monkeypatch, capsys):
    # A run started with a relative --out saves that relative out: given back as --config
    # from another directory (or after the run directory moved), the file's out named
    # another directory, so --resume auto started a fresh run there and the refusal to
    # write into an existing run did not see it. The run is the directory holding the file.
    import shutil
    monkeypatch.chdir(tmp_path)
    training.train(data=str(made16), out="runs/a", steps=1, **KW)
    assert json.loads((tmp_path / "runs/a/config.json").read_text())["out"] == "runs/a"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = "../runs/a/config.json"

    def kwargs(*argv, config=cfg):
        return cli_train.train_kwargs(_parser().parse_args(["train", "--config", config, *argv]))
    assert Path(kwargs("--resume", "auto")["out"]).resolve() == tmp_path / "runs/a"
    a = _parser().parse_args(["train", "--config", cfg, "--device", "cpu", "--no-progress"])
    capsys.readouterr()
    assert a.func(a) == 2
    assert "which exists; give --out" in capsys.readouterr().err
    a = _parser().parse_args(["train", "--config", cfg, "--resume", "auto", "--steps", "2",
                              "--device", "cpu", "--no-progress"])
    assert a.func(a) == 0                                   # continued, not started anew
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "runs/a/checkpoints")] == [2, 1]
    assert not (elsewhere / "runs").exists()
    # moved: the file's out (relative or not) names a directory that is gone
    shutil.move(tmp_path / "runs/a", tmp_path / "moved")
    assert kwargs("--resume", "auto", config="../moved/config.json")["out"] == "../moved"
    # --out still names the run, and a file outside a run directory keeps its out
    assert kwargs("--out", "new", config="../moved/config.json")["out"] == "new"
    shutil.copy(tmp_path / "moved/config.json", elsewhere / "copy.json")
    assert kwargs(config="copy.json")["out"] == \
        json.loads((elsewhere / "copy.json").read_text())["out"]     # the resumed run's


def test_train_help_documents_every_flag_with_the_documented_default():
    # Every flag of `blurfast train --help` says what it does, and the default it shows
    # (read off train() and BlurDiffusion) is the one docs/training.md's tables give.
    import re
    from pathlib import Path
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    train_p = sub.choices["train"]
    shown = {}
    for a in train_p._actions:
        assert a.help, f"{a.option_strings} has no help"
        m = re.search(r"\(default: ([^)]*)\)$", a.help)
        if m:
            shown[a.option_strings[0]] = m.group(1)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    doc = doc[doc.index("### Flags (and `train()` arguments)"):doc.index("### The step")]
    compared = 0
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(--[a-z0-9-]+)(?:/--no-[a-z0-9-]+)?`(?: \(.*\))?", cells[0])
        if not m or m.group(1) not in shown:
            continue
        flag = m.group(1)
        want = cells[2 if len(cells) == 4 else 1].replace("`", "")  # flag, train(), default, meaning
        got = shown[flag]
        try:
            assert float(want) == float(got), flag
        except ValueError:
            assert want.split()[0] == got.split()[0], (flag, want, got)
        compared += 1
    assert compared >= 25, compared


# A tiny run on CPU whose step or sample grid the tests below make run out of memory.
_OOM_ARGV = ["--resolution", "16", "--base-channels", "32", "--channel-mult", "1", "2",
             "--num-res-blocks", "1", "--steps", "2", "--sample-count", "1", "--sample-steps",
             "1", "--no-progress", "--device", "cpu"]


def _oom(*args, **kw):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n"
                                      "more lines")


@pytest.mark.parametrize("flags, advice", [
    (["--batch-size", "16"], "try --activation-checkpointing (the same step, keeping a "
                             "fraction of its activations), --grad-accum 2 (the same step in "
                             "2 rounds of 8 images, a smaller share of the memory) or a "
                             "smaller --batch-size"),
    (["--batch-size", "6", "--grad-accum", "2", "--activation-checkpointing"],
     "try --grad-accum 3 (the same step in 3 rounds of 2 images"),
    (["--batch-size", "5", "--grad-accum", "5", "--activation-checkpointing"],
     "try a smaller --batch-size"),
    (["--batch-size", "5", "--grad-accum", "5"], "try --activation-checkpointing (the same "
                                                  "step, keeping a fraction of its "
                                                  "activations) or a smaller --batch-size"),
])
def test_cli_out_of_memory_names_the_flags_that_save_memory(made16, tmp_path, capsys,
                                                           monkeypatch, flags, advice):
    monkeypatch.setattr(training.TrainStep, "__call__", _oom)     # where a step runs out
    monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
    from blurfast import cli
    assert cli.main(["train", "--data", str(made16), "--out", str(tmp_path / "r"),
                     *_OOM_ARGV, *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blurfast train: error: the GPU ran out of memory with --batch-size")
    assert advice in err and err.endswith(
        "(torch: CUDA out of memory. Tried to allocate 2.00 GiB)\n")


def test_cli_out_of_memory_outside_a_step_does_not_advise_grad_accum(made16, tmp_path, capsys,
                                                                    monkeypatch):
    # A sample grid or FID (4 x --batch-size / K images at a time) ran out:
    # the step's advice (more rounds) is not given; the message names what sizes them.
    monkeypatch.setattr(training, "_save_samples", _oom)
    monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
    from blurfast import cli
    assert cli.main(["train", "--data", str(made16), "--out", str(tmp_path / "r"),
                     *_OOM_ARGV, "--batch-size", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blurfast train: error: the GPU ran out of memory outside a "
                          "training step (its sample grids and FID sample")
    assert "4 x --batch-size / --grad-accum = 16 images at a time" in err
    assert "try --grad-accum" not in err
    assert err.endswith("(torch: CUDA out of memory. Tried to allocate 2.00 GiB)\n")


def test_cli_prepare_reports_once_and_warnings_are_one_line(tmp_path, capsys):
    # prepare reports a bad image once (no warning repeating it), naming the file, not
    # Pillow's in-memory buffer; a warning (train reading that image) prints as one line
    # 'blurfast: warning: ...', and only while the command runs.
    import warnings
    from blurfast import cli
    src = made_photos(tmp_path / "src", 4, size=20)
    (src / "00002.png").write_bytes(b"broken")
    before = warnings.showwarning
    assert cli.main(["prepare", str(src), str(tmp_path / "o.npy"), "--resolution", "8",
                     "--resize", "center-crop", "--workers", "0", "--no-progress"]) == 0
    got = capsys.readouterr()
    assert "3 images" in got.out and "1 unreadable skipped" in got.out
    assert f"  unreadable: {src / '00002.png'}: cannot be decoded (UnidentifiedImageError: " \
           f"cannot identify image file {str(src / '00002.png')!r})" in got.out.splitlines()
    assert "BytesIO" not in got.out and got.err == ""
    assert np.load(tmp_path / "o.npy").shape == (3, 8, 8, 3)

    assert cli.main(["train", "--data", str(src), "--out", str(tmp_path / "r"), "--resolution",
                     "8", "--batch-size", "4", "--steps", "1", "--base-channels", "32",
                     "--channel-mult", "1", "2", "--num-res-blocks", "1", "--sample-count",
                     "1", "--sample-steps", "1", "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"blurfast: warning: data: skipping {src / '00002.png'}: cannot be decoded "
                   f"(UnidentifiedImageError: cannot identify image file "
                   f"{str(src / '00002.png')!r}); `blurfast prepare` leaves such images out "
                   f"once and for all"]
    assert warnings.showwarning is before


def test_prepare_keeps_an_existing_array_unless_told(tmp_path, capsys):
    # A second prepare into the same OUT (here: --limit 2 after 4 images) is refused,
    # naming OUT and --overwrite, and leaves the array as it was; --overwrite replaces it.
    from blurfast import cli
    src = made_photos(tmp_path / "src", 4, size=8)
    out = tmp_path / "o.npy"
    argv = ["prepare", str(src), str(out), "--resolution", "8", "--workers", "0",
            "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--limit", "2"]) == 2
    assert capsys.readouterr().err == (f"blurfast prepare: error: out: {str(out)!r} exists; "
                                       f"pass overwrite=True (--overwrite) to replace it\n")
    assert np.load(out).shape == (4, 8, 8, 3)
    assert cli.main(argv + ["--limit", "2", "--overwrite"]) == 0
    assert np.load(out).shape == (2, 8, 8, 3)


def test_ctrl_c_ends_a_command_in_one_line_with_130(tmp_path, capsys, monkeypatch):
    # A KeyboardInterrupt out of a command (prepare, sample, fid, bench, ... after they
    # removed what they had half-written) is one line and the shell's exit code for
    # SIGINT; BLURFAST_DEBUG=1 shows the traceback.
    from blurfast import cli
    from blurfast import data as Dm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Dm, "prepare", interrupted)
    monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
    argv = ["prepare", str(tmp_path), str(tmp_path / "o.npy"), "--no-progress"]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == "blurfast prepare: interrupted\n"
    monkeypatch.setenv("BLURFAST_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)


def test_prepare_lsun_script_keeps_prepared_arrays(tmp_path):
    # scripts/prepare_lsun.sh run again skips the arrays it made (a stand-in blurfast
    # records each call); OVERWRITE=1 decodes them again with --overwrite.
    (tmp_path / "lsun" / "church_outdoor_train_lmdb").mkdir(parents=True)
    (tmp_path / "lsun" / "church_outdoor_train_lmdb" / "data.mdb").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "blurfast").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls"\n'
                                      f'touch "$3"\n')
    (bin_dir / "blurfast").chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_lsun.sh"

    def run(**env):
        return subprocess.run(["bash", str(script), str(tmp_path / "lsun"),
                               str(tmp_path / "data"), "church_outdoor"], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   **env}).stdout
    out = tmp_path / "data" / "church_outdoor_64.npy"
    run()
    assert "exists, kept (OVERWRITE=1" in run()
    run(OVERWRITE="1")
    src = tmp_path / "lsun" / "church_outdoor_train_lmdb"
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"prepare {src} {out} --resolution 64 --resize squash",
        f"prepare {src} {out} --resolution 64 --resize squash --overwrite"]


def test_a_run_on_an_array_prepared_with_another_resize_warns(tmp_path):
    # Its --fid-ref and `blurfast draw` read folders with the run's resize: a run on a
    # squashed array with the default center-crop would compare other crops.
    data = tmp_path / "sq.npy"
    D.prepare(made_photos(tmp_path / "src", 8), data, resolution=16, resize="squash",
              workers=0, progress=False)
    # Worded for train() and the CLI alike: the argument, its flag in brackets.
    with pytest.warns(UserWarning, match=rf"^resize: {re.escape(str(data))} was prepared with "
                                         rf"--resize squash, this run has center-crop, with "
                                         rf"which fid_ref \(--fid-ref\) and `blurfast draw` "
                                         rf"read folders and lmdb; give resize \(--resize\) "
                                         rf"squash$"):
        training.train(data=str(data), out=str(tmp_path / "a"), steps=1, **KW)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resize: ")
        training.train(data=str(data), out=str(tmp_path / "b"), steps=1, resize="squash", **KW)


# ------------------------------------------------------------------------ arguments

@pytest.mark.parametrize("change, name", [
    (dict(steps=0), "steps"),
    (dict(preset="huge"), "preset"),
    (dict(lr=-1.0), "lr"),
    (dict(ema_halflife_kimg=10.0), "ema_decay, ema_halflife_kimg"),
    (dict(diffusion=dict(resolution=32)), "diffusion"),
    (dict(model={**TINY, "resolution": 32}), r"^model: its resolution 32 differs from "
                                             r"resolution=16"),
    (dict(model={**TINY, "channels": 1}), r"^model: its channels 1 differs from channels=3"),
    (dict(device="tpu"), "device"),
    (dict(cuda_graphs=True), "cuda_graphs"),
    (dict(pixel_range="0,255"), "pixel_range"),
    (dict(betas=(0.9,)), "betas"),
    (dict(keep=0), "keep"),
    (dict(seed=2 ** 32), r"^seed: expected an int in \[0, 4294967295\], got 4294967296"),
    (dict(resize="bogus"), r"^resize: expected one of \('squash', 'center-crop'\), got 'bogus'"),
    (dict(fid_every=2), r"^fid_ref \(--fid-ref\): needed with fid_every \(--fid-every\)"),
    (dict(fid_ref="ref.npz"), r"^fid_ref \(--fid-ref\): given without fid_every \(--fid-every\)"),
    (dict(fid_every=2, fid_ref="/no/such/ref"), r"^fid_ref \(--fid-ref\): '/no/such/ref' does "
                                                r"not exist"),
])
def test_bad_arguments_name_the_argument(made16, tmp_path, change, name):
    with pytest.raises(ValueError, match=name):
        training.train(data=str(made16), out=str(tmp_path / "r"), **{**KW, "steps": 1, **change})


def test_ema_halflife_kimg_alone_says_to_pass_ema_decay_none(made16, tmp_path):
    # ema_decay defaults to 0.9999: ema_halflife_kimg given alone is both, and the error
    # says what to pass instead of "give exactly one" to a call that gave one.
    kw = {k: v for k, v in KW.items() if k != "ema_decay"}
    with pytest.raises(ValueError, match=r"^ema_decay, ema_halflife_kimg: give exactly one, "
                                         r"the other None; got 0\.9999 and 10\.0 \(.*pass "
                                         r"ema_decay=None with ema_halflife_kimg\)$"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       ema_halflife_kimg=10.0, **kw)
    with pytest.raises(ValueError, match=r"the other None; got None and None"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, ema_decay=None,
                       **kw)


def test_data_errors_name_the_flag_too(tmp_path, capsys):
    # An image folder with no images, given as train()'s data or as --data: the error
    # names both forms of the argument; prepare's names its SRC.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data \(--data\): no \.jpg/.* files under "):
        training.train(data=str(tmp_path / "empty"), out=str(tmp_path / "r"), steps=1, **KW)
    a = _parser().parse_args(["train", "--data", str(tmp_path / "empty"), "--out",
                              str(tmp_path / "r"), "--resolution", "16", "--device", "cpu"])
    assert a.func(a) == 2
    assert capsys.readouterr().err.startswith("blurfast train: error: data (--data): no .jpg")
    with pytest.raises(ValueError, match=r"^src: no \.jpg/.* files under "):
        D.prepare(tmp_path / "empty", tmp_path / "o.npy", progress=False)


def test_a_failed_fid_setup_leaves_no_run_directory(made16, tmp_path, monkeypatch):
    # The Inception weights missing: the error, and no skeleton of a run left behind.
    from blurfast import evaluation

    def missing(path=None, device="cpu", download=True):
        raise FileNotFoundError("inception: InceptionV3 weights not found at /nowhere")

    monkeypatch.setattr(evaluation, "inception_extractor", missing)
    with pytest.raises(FileNotFoundError, match="^inception: InceptionV3 weights not found"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=2, fid_every=2,
                       fid_ref=str(made16), **KW)
    assert not (tmp_path / "r").exists()


def test_type_errors_and_existing_runs(made16, tmp_path):
    with pytest.raises(TypeError, match="flip"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, **{**KW, "flip": 1})
    with pytest.raises(TypeError, match="model"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "model": [1]})
    with pytest.raises(TypeError, match="cuda_graphs"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "cuda_graphs": "yes"})
    with pytest.raises(TypeError, match="^compile: expected a bool or None"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "compile": "yes"})
    with pytest.raises(TypeError, match="^out: expected a path, got None"):
        training.train(data=str(made16), out=None, steps=1, **KW)
    with pytest.raises(TypeError, match=r"^model: unknown UNet arguments \['widht'\]"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "model": {**TINY, "widht": 3}})
    with pytest.raises(TypeError, match=r"^diffusion: unknown BlurDiffusion arguments"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "diffusion": {"bogus": 1}})
    with pytest.raises(TypeError, match="^channel_mult: expected a sequence"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1,
                       **{**KW, "model": {**TINY, "channel_mult": 2}})
    training.train(data=str(made16), out=str(tmp_path / "r"), steps=2, **KW)
    # cuda_graphs=None and compile=None (the defaults) resolve to off on a CPU, and the
    # config says so.
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert written["cuda_graphs"] is False and written["compile"] is False
    with pytest.raises(ValueError, match=r"already holds checkpoints; pass resume='auto' "
                                         r"\(--resume auto\)"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=4, **KW)
    with pytest.raises(ValueError, match="^steps: 1 is below the resumed step 2"):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=1, resume="auto", **KW)
    with pytest.raises(ValueError, match=r"^resume: model.num_res_blocks 2 differs from the "
                                         r"checkpoint's 1 \("):
        training.train(data=str(made16), out=str(tmp_path / "r"), steps=4, resume="auto",
                       **{**KW, "model": {**TINY, "num_res_blocks": 2}})


def test_an_out_that_cannot_be_made_is_named_before_the_data_is_read(made16, tmp_path,
                                                                     monkeypatch, capsys):
    def opened(*a, **k):
        raise AssertionError("the data was opened first")
    monkeypatch.setattr(D, "open_dataset", opened)
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "run", tmp_path / "afile"):
        with pytest.raises(ValueError, match=rf"^out \(--out\): cannot create run directory "
                                             rf"'{out}': '.*afile' is not a folder$"):
            training.train(data=str(made16), out=str(out), steps=1, **KW)
    a = _parser().parse_args(["train", "--data", str(made16), "--out",
                              str(tmp_path / "afile" / "run"), "--device", "cpu"])
    assert a.func(a) == 2
    assert capsys.readouterr().err.startswith("blurfast train: error: out (--out): cannot "
                                              "create run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]     # the probe is gone


def _cli_error(tmp_path, capsys, *argv) -> str:
    """stderr of a `blurfast train` that must fail (exit 2) in one line before it reads
    its data, which does not exist."""
    a = _parser().parse_args(["train", "--data", str(tmp_path / "none.npy"), "--out",
                              str(tmp_path / "r"), "--device", "cpu", *argv])
    assert a.func(a) == 2
    text = capsys.readouterr().err
    assert text.count("\n") == 1, text
    return text


def test_cli_grad_clip_0_is_refused_as_by_train(tmp_path, capsys):
    # 0 meant no clipping on the command line while train(grad_clip=0) refuses it; 'none'
    # is the documented way.
    assert _cli_error(tmp_path, capsys, "--grad-clip", "0") == (
        "blurfast train: error: grad_clip: expected a finite number > 0 or None, got 0.0\n")


def test_cli_config_groups_of_the_wrong_type_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    for text, msg in (("model: [1, 2]\n", "model: expected a dict of UNet arguments, got list"),
                      ("model: {channel_mult: 4}\n", "channel_mult: expected a sequence of "
                                                     "ints, got 4"),
                      ("diffusion: 3\n", "diffusion: expected a dict of BlurDiffusion "
                                         "arguments, got int")):
        cfg.write_text(text)
        assert _cli_error(tmp_path, capsys, "--config", str(cfg)) == \
            f"blurfast train: error: {msg}\n"


def test_cli_config_out_and_resume_of_the_wrong_type_name_the_key(tmp_path, capsys):
    # With resume given, the saved run's arguments are read from out: a value that is no
    # path is named as train() names it (it was a TypeError of pathlib's, naming neither).
    cfg = tmp_path / "c.yaml"
    for text, msg in (("resume: 5\n", "resume: expected None, 'auto' or a path, got 5"),
                      ("resume: auto\nout: 5\n", "out: expected a path, got 5"),
                      ("resume: auto\nout: null\n", "out: expected a path, got None")):
        cfg.write_text(text)
        argv = ["--config", str(cfg)] + (["--out", str(tmp_path / "r")] if "out" not in text
                                         else [])
        a = _parser().parse_args(["train", "--data", str(tmp_path / "none.npy"),
                                  "--device", "cpu", *argv])
        assert a.func(a) == 2
        assert capsys.readouterr().err == f"blurfast train: error: {msg}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_cli_config_that_does_not_parse_is_one_line_with_the_position(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\n  batch_size: 2\n")
    assert _cli_error(tmp_path, capsys, "--config", str(cfg)) == (
        f"blurfast train: error: config: {str(cfg)!r} does not parse: mapping values are not "
        f"allowed here (line 2, column 13)\n")
    cfg = tmp_path / "c.json"
    cfg.write_text('{"lr": 1e-3,\n "batch_size": }')
    assert _cli_error(tmp_path, capsys, "--config", str(cfg)) == (
        f"blurfast train: error: config: {str(cfg)!r} does not parse: Expecting value "
        f"(line 2, column 16)\n")


def test_compile_that_cannot_run_is_refused_before_a_step(made16, tmp_path, monkeypatch):
    # A GPU without Triton's support (compile_problem's reason, a stand-in here) refuses
    # compile=True at once, not with Inductor's error at the first step; asked for
    # nothing, the run goes on uncompiled (compile None, on a CPU off anyway).
    monkeypatch.setattr(training, "compile_problem", lambda dev: "no triton here")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^compile: no triton here; train without it "
                                         r"\(compile=False, --no-compile\)$"):
        training.train(data=str(made16), out=str(out), steps=1, compile=True, **KW)
    assert not (out / "checkpoints").exists()
    assert training.train(data=str(made16), out=str(out), steps=1, **KW)["steps_run"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 1e-3)])
def test_compiled_step_matches_eager(precision, rel):
    # torch.compile of the model (with the dct2 custom op of freq_input) and channels_last
    # change nothing but rounding; in bf16 the compiled step also casts its weights once
    # (cast_once), against autocast's casts in the eager one. Minutes on CPU: compiling
    # dominates. (bf16 measured: loss 2e-6 and gradient norm 3e-4 apart, relative.)
    diff = BlurDiffusion(resolution=16)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    t, flip = torch.tensor([5, 50, 500, 900]), torch.tensor([True, False, True, False])
    stats = []
    for compiled in (False, True):
        torch.manual_seed(0)
        step = training.TrainStep(UNet(resolution=16, freq_input=True, **TINY), diff,
                                  device="cpu", lr=1e-3, compile=compiled,
                                  channels_last=compiled, precision=precision,
                                  cast_once=compiled and precision == "bf16")
        for i in range(2):
            step(x, flip, t, i, 0)
        stats.append(step.read_stats())
    assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=rel)
    assert stats[1]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=10 * rel)


# ------------------------------------------------------------------------ recipes

def _recipe_argv(script: str, tmp_path: Path, env_extra=None) -> list:
    """The `blurfast train` arguments a recipe script runs, caught by stand-ins for
    blurfast and torchrun put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    catch = f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\n'
    for name in ("blurfast", "torchrun"):
        (bin_dir / name).write_text(catch)
        (bin_dir / name).chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env_extra or {})}
    subprocess.run(["bash", str(root / "scripts" / script), "DATA.npy", "RUN"], env=env,
                   check=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    if script.endswith("multigpu.sh"):               # torchrun's own options, then the module
        argv = argv[argv.index("blurfast") + 1:]
    return argv


def _subcommand_actions(command: str):
    """(option strings, values to pass) of each option of `blurfast COMMAND`, read off
    the CLI's own parser."""
    from blurfast import cli
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            count = 0
        else:
            count = action.nargs if isinstance(action.nargs, int) else 1
        yield action.option_strings, ["1"] * count


@pytest.mark.parametrize("command, plain_only", [("sample", {"--n"}), ("train", set())])
def test_every_flag_passes_through_torchrun(command, plain_only):
    # torchrun's parser classifies every argument, also those after the module, and stops
    # at an ambiguous prefix of its own options (--n: --nnodes, --nproc-per-node, ...).
    # Every option has a spelling torchrun passes on; only `plain_only` aliases fail.
    from torch.distributed.run import get_args_parser

    def refuse(message):
        raise ValueError(message)
    actions = list(_subcommand_actions(command))
    assert len(actions) > 10
    rejected = set()
    for flags, values in actions:
        passed = []
        for flag in flags:
            tail = [command, flag, *values]
            tp = get_args_parser()
            tp.error = refuse
            try:
                a = tp.parse_args(["--standalone", "--nproc-per-node=2", "-m", "blurfast",
                                   *tail])
            except ValueError as e:
                assert "ambiguous option" in str(e)
                rejected.add(flag)
                continue
            assert (a.module, a.training_script, a.training_script_args) == \
                (True, "blurfast", tail)
            passed.append(flag)
        assert passed, f"torchrun rejects every spelling of blurfast {command} {flags}"
    assert rejected == plain_only


@pytest.mark.parametrize("script, env, steps, batch, graphs", [
    ("train_lsun_church64.sh", {}, 600_000, 16, True),
    ("train_lsun_bedroom64.sh", {}, 450_000, 16, True),
    ("train_lsun_church64_multigpu.sh", {"NGPUS": "8"}, 600_000, 2, False),
])
def test_recipes_run_the_papers_settings(tmp_path, script, env, steps, batch, graphs):
    # The paper's LSUN 64x64 settings (Lee et al. 2022, section 5 and its code), written
    # out here: what each recipe must hand to train().
    a = _parser().parse_args(_recipe_argv(script, tmp_path, env))
    kw = cli_train.train_kwargs(a)
    assert kw["diffusion"] == dict(num_steps=1000, noise_schedule="linear", beta_min=1e-4,
                                   beta_max=0.02, blur_schedule="quartic", sigma=0.4,
                                   sigma_min=0.0, sigma_max=0.15)
    assert (kw["preset"], kw["resolution"], kw["resize"], kw["pixel_range"]) == \
        ("paper64", 64, "squash", "0,1")
    assert (kw["lr"], kw["optimizer"], kw["ema_decay"], kw["grad_clip"]) == \
        (5e-5, "adam", 0.9999, 1.0)
    assert kw["batch_size"] * int(env.get("NGPUS", 1)) == 16 and kw["batch_size"] == batch
    assert kw["steps"] == steps and kw["target"] == "eps" and kw["flip"] is True
    assert kw["cuda_graphs"] is graphs and kw["compile"] is True
    assert (kw["data"], kw["out"], kw["resume"]) == ("DATA.npy", "RUN", "auto")



@pytest.mark.parametrize("visible, procs", [(None, 8), ("0,1", 2), ("GPU-3f2a,GPU-9c1b,2,3", 4),
                                            ("", None)])
def test_multigpu_recipe_counts_the_gpus_it_may_use(tmp_path, visible, procs):
    # Without NGPUS: one process per GPU that CUDA_VISIBLE_DEVICES leaves visible, else per
    # GPU line of nvidia-smi -L (here 8 GPUs, each with a MIG line); the global batch stays
    # 16. It counted every line of nvidia-smi -L (16 here), whatever CUDA_VISIBLE_DEVICES
    # said: processes for GPUs that are not there, which fail at set_device.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(
        f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\necho '  MIG 3g.40gb Device 0: (x)'\n"
        for i in range(8)))
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["bash", str(root / "scripts" / "train_lsun_church64_multigpu.sh"),
                        "DATA.npy", "RUN"], env=env, capture_output=True, text=True)
    if procs is None:
        assert p.returncode == 2 and "NGPUS=0: expected the number of GPUs" in p.stderr
        assert not (tmp_path / "argv").exists()
        return
    assert p.returncode == 0, p.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert f"--nproc_per_node={procs}" in argv
    assert int(argv[argv.index("--batch-size") + 1]) * procs == 16


def _eval_fid10k_calls(tmp_path: Path, env_extra: dict, earlier: str = ""):
    """Runs scripts/eval_fid10k.sh with stand-ins for blurfast and torchrun that log each
    call (its arguments, tab-separated); the blurfast stand-in prints an FID and fails
    `fid --check` when FAIL_CHECK is set. ``earlier``: the fid10k.txt an earlier run left.
    Returns the process and the calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(parents=True)
    for name in ("blurfast", "torchrun"):
        (bin_dir / name).write_text(textwrap.dedent(f"""\
            #!/bin/sh
            {{ printf %s {name}; for a in "$@"; do printf '\\t%s' "$a"; done; echo; }} >> "{log}"
            if [ "$1 $2" = "fid --check" ] && [ -n "${{FAIL_CHECK:-}}" ]; then
              echo "blurfast fid: error: inception: weights not found" >&2; exit 2
            fi
            if [ "{name} $1" = "blurfast fid" ] && [ "$2" != "--check" ]; then
              echo "samples: 12 images from x"; echo "FID 1.5"
              case "$*" in *--kid*) echo "KID 0.25 (standard deviation 0.01 over 100 subsets)";; esac
            fi
            """))
        (bin_dir / name).chmod(0o755)
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(resolution=16, resize="center-crop",
                                                     channels=1, steps=5)))
    if earlier:
        (run / "fid10k").mkdir()
        (run / "fid10k" / "fid10k.txt").write_text(earlier)
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    p = subprocess.run(["bash", str(root / "scripts" / "eval_fid10k.sh"), str(run), "REF.npy"],
                       env={**os.environ, "PATH": path, **env_extra}, capture_output=True,
                       text=True)
    calls = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return p, calls


def test_eval_fid10k_checks_inception_and_the_reference_before_sampling(tmp_path):
    from torch.distributed.run import get_args_parser

    from blurfast import cli
    p, calls = _eval_fid10k_calls(tmp_path, {"NPROC": "2", "N": "12"},
                                  earlier="ddim steps=100 FID 9.9\n")
    assert p.returncode == 0, p.stderr
    fid_args = ["--ref", "REF.npy", "--n", "12", "--resolution", "16", "--resize",
                "center-crop", "--channels", "1"]
    assert calls[0] == ["blurfast", "fid", "--check", *fid_args]
    assert [c[:2] for c in calls[1:]] == [["torchrun", "--standalone"], ["blurfast", "fid"]] * 2
    for (sampler, steps), sample, fid in zip([("reverse_sde", 0), ("ddim", 100)],
                                             calls[1::2], calls[2::2]):
        t = get_args_parser().parse_args(sample[1:])       # torchrun's parser takes them
        a = cli.build_parser().parse_args(t.training_script_args)
        assert (t.training_script, a.command, a.n, a.sampler, a.steps, a.fmt) == \
            ("blurfast", "sample", 12, sampler, steps, "npz")
        assert fid[1:] == ["fid", "--samples", f"{a.out}/samples.npz", *fid_args]
    # A rerun's file holds its own lines only, not an earlier run's too.
    assert (tmp_path / "RUN" / "fid10k" / "fid10k.txt").read_text() == \
        "reverse_sde steps=full FID 1.5\nddim steps=100 FID 1.5\n"
    # Weights missing: the script stops at the check, before any sample is made.
    p, calls = _eval_fid10k_calls(tmp_path / "fail", {"FAIL_CHECK": "1"})
    assert p.returncode == 2 and "inception: weights not found" in p.stderr
    assert [c[:3] for c in calls] == [["blurfast", "fid", "--check"]]
    # KID=1: checked and scored with --kid, both scores on each line.
    p, calls = _eval_fid10k_calls(tmp_path / "kid", {"KID": "1", "N": "12"})
    assert p.returncode == 0, p.stderr
    assert calls[0][-1] == "--kid" and all(c[-1] == "--kid" for c in calls[2::2])
    assert (tmp_path / "kid" / "RUN" / "fid10k" / "fid10k.txt").read_text() == "".join(
        f"{s} FID 1.5; KID 0.25 (standard deviation 0.01 over 100 subsets)\n"
        for s in ("reverse_sde steps=full", "ddim steps=100"))
    # KID=0 is off, as KID unset (it asked for the KID as KID=1 does).
    p, calls = _eval_fid10k_calls(tmp_path / "kid0", {"KID": "0", "N": "12"})
    assert p.returncode == 0, p.stderr
    assert not any("--kid" in c for c in calls)


# ------------------------------------------------------------------------ step bookkeeping

def test_dropout_is_seeded_from_seed_step_and_rank_before_every_step(made16, tmp_path,
                                                                     monkeypatch):
    # The documented contract (docs/training.md, "The step"): before every step train()
    # seeds torch's generator (dropout; a captured step's noise) from (seed, step, rank),
    # so it is a function of the step. The truth: NumPy's SeedSequence hash of
    # (seed, step, 3, rank), 62 bits, written out here.
    seen = []
    real = training.TrainStep.__call__

    def spy(self, *a, **k):
        seen.append(torch.initial_seed())          # what the last manual_seed set
        return real(self, *a, **k)

    monkeypatch.setattr(training.TrainStep, "__call__", spy)
    seed = 7
    training.train(data=str(made16), out=str(tmp_path / "r"), steps=3, seed=seed,
                   **{**KW, "model": {**TINY, "dropout": 0.5}})

    def expected(step, rank=0):
        a, b = np.random.SeedSequence([seed, step, 3, rank]).generate_state(2, np.uint32)
        return ((int(a) << 32) | int(b)) & (2 ** 62 - 1)

    assert seen == [expected(s) for s in range(3)]
    assert len(set(seen)) == 3                     # each step its own dropout masks


def test_second_sigint_aborts_and_sigterms_only_set_the_flag():
    # _Signals: SIGTERM or SIGINT sets `received` (the run saves and stops between
    # steps); a second SIGINT raises KeyboardInterrupt (Ctrl-C twice aborts at once).
    def send(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)            # the Python-level handler runs at the next bytecode

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with training._Signals() as s:
        send(signal.SIGINT)
        assert s.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
    with training._Signals() as s:
        send(signal.SIGTERM)
        send(signal.SIGTERM)                       # no exception
        assert s.received == "SIGTERM"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_first_signal_is_announced_once(capsys):
    # A step can take minutes (the first compiles): the run says at once that it heard.
    def send(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)

    with training._Signals("stopping after this step") as s:
        send(signal.SIGTERM)
        send(signal.SIGTERM)
    assert capsys.readouterr().err == "\nSIGTERM: stopping after this step\n"
    with training._Signals("stopping after this step"):
        send(signal.SIGINT)
    assert capsys.readouterr().err == ("\nSIGINT: stopping after this step; Ctrl-C again "
                                       "stops at once, unsaved\n")
    with training._Signals():                       # a rank other than 0 says nothing
        send(signal.SIGTERM)
    assert capsys.readouterr().err == ""


def test_sample_grid_of_a_0_1_run_maps_mid_grey_to_level_128(made16, tmp_path, monkeypatch):
    # A pixel_range="0,1" run samples in [0, 1]; its grid maps that range onto 0..255.
    # With every sample 0.5 (mid-grey), each tile pixel is round(0.5 * 255) = 128 (127.5
    # rounds to 128 both half-up and half-to-even); the 1-pixel gaps stay white (255).
    from PIL import Image

    from blurfast import sampling
    monkeypatch.setattr(sampling, "sample",
                        lambda model, diff, shape, *a, **k: torch.full(shape, 0.5))
    out = tmp_path / "r"
    training.train(data=str(made16), out=str(out), steps=1, pixel_range="0,1",
                   **{**KW, "sample_every": 1, "sample_count": 4})
    pic = np.asarray(Image.open(out / "samples" / "step_000000001.png"))
    assert pic.shape == (33, 33, 3)                # 2x2 tiles of 16x16, 1-pixel gaps
    tiles = np.delete(np.delete(pic, 16, axis=0), 16, axis=1)
    assert (tiles == 128).all(), np.unique(tiles)
    assert (pic[16] == 255).all() and (pic[:, 16] == 255).all()


def test_read_stats_grad_norm_is_the_mean_since_the_last_read():
    # step, read, step, read: the second grad_norm is step 2's own gradient norm (the
    # read resets the sums and their counts), not over a count still holding step 1. The
    # truth: step 2's loss and gradient norm in float64 from the weights after step 1 and
    # q_sample's x_t and eps (as in test_logged_means_leave_a_skipped_step_out).
    import copy
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    step = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=1e-2,
                              flip=False)
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    t, flip = torch.tensor([3, 40, 400, 990]), torch.zeros(4, dtype=torch.bool)
    step(x, flip, t, 5, 0)
    step.read_stats()
    ref = copy.deepcopy(step.model).double()      # the weights step 2 starts from
    step(x, flip, t, 6, 0)
    second = step.read_stats()

    loss, norm = _float64_loss_and_norm(ref, diff, x, t, seed=6)
    # float32 step against float64: measured rel. error 5e-8 (loss), 3e-8 (norm), bounds
    # 20x and 30x that; a read that left step 1 in the count would halve the norm
    assert second["loss"] == pytest.approx(loss, rel=1e-6)
    assert second["grad_norm"] == pytest.approx(norm, rel=1e-6)


@pytest.mark.parametrize("owns, finished, calls", [
    (True, True, ["barrier", "destroy"]),   # ranks that finished meet, then tear down
    (True, False, ["destroy"]),             # after an error: no barrier (peers may not come)
    (False, True, []),                      # a group made by someone else is left alone
    (False, False, []),
])
def test_teardown_barrier_only_after_a_finished_run(monkeypatch, owns, finished, calls):
    import torch.distributed as dist

    from blurfast import distributed
    seen = []
    monkeypatch.setattr(distributed, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: seen.append("destroy"))
    distributed.teardown_processes(owns, finished)
    assert seen == calls


def test_more_processes_than_gpus_is_an_error_naming_the_process_count(monkeypatch):
    # torchrun --nproc_per_node=4 on a machine with 2 GPUs: ranks 2 and 3 stop with a line
    # that says so, before set_device (an invalid device ordinal) or the process group.
    import torch.distributed as dist

    from blurfast import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device called"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("group made"))
    for k, v in {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"^device: this process is LOCAL_RANK 2 of a machine "
                                         r"where torch sees 2 GPUs; start at most 2 processes "
                                         r"per machine \(torchrun --nproc_per_node=2\)$"):
        distributed.setup_processes("cuda")


def test_blurfast_debug_shows_the_traceback_of_train_and_prepare(tmp_path, monkeypatch, capsys):
    # README: bad input is one line, exit code 2; BLURFAST_DEBUG=1 shows the traceback
    # instead. train and prepare printed the line themselves, whatever BLURFAST_DEBUG said.
    from blurfast import cli
    missing = str(tmp_path / "none")
    for argv in (["prepare", missing, str(tmp_path / "o.npy"), "--no-progress"],
                 ["train", "--data", missing + ".npy", "--out", str(tmp_path / "r"),
                  "--device", "cpu", "--no-progress"]):
        monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith(f"blurfast {argv[0]}: error: ")
        monkeypatch.setenv("BLURFAST_DEBUG", "1")
        with pytest.raises(ValueError):
            cli.main(argv)


def test_sample_grids_in_batches_are_the_grid_at_once(tmp_path):
    # A run's grid drawn 3 images at a time (the last batch of 1) is the grid drawn at once,
    # bit for bit: image i's noise is at Philox offset i * C*H*W either way.
    from PIL import Image
    diff = BlurDiffusion(resolution=16, num_steps=20)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    with torch.no_grad():                         # an output that is not zero
        model.out[-1].weight.normal_(0, 0.05)
    for batch in (None, 3):
        training._save_samples(model, diff, tmp_path / f"{batch}.png", 7, 4, "-1,1", "eps",
                               "cpu", batch=batch)
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in (None, 3))
    assert np.array_equal(a, b) and a.std() > 10


def test_loaded_step_keeps_its_own_learning_rate():
    # Optimizer.load_state_dict restores the saved groups' lr; a TrainStep keeps its own
    # (the constructor's, or set_lr's), with or without CUDA graphs. Truth: a step from the
    # same state whose saved lr is the new one.
    diff, x, t, flip = _step_setup()

    def stepper(lr):
        torch.manual_seed(0)
        return training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu", lr=lr)
    old = stepper(1e-3)
    old(x, flip, t, 1, 0)
    state = old.state_dict()
    for lr, set_lr in ((0.05, None), (1e-3, 0.02)):
        got, want = stepper(lr), stepper(lr)
        if set_lr is not None:
            got.set_lr(set_lr)
            want.set_lr(set_lr)
        own = copy.deepcopy(state)
        own["optimizer"]["param_groups"][0]["lr"] = set_lr or lr
        got.load_state_dict(state, old.model.state_dict(), old.ema.state_dict())
        want.opt.load_state_dict(own["optimizer"])
        want.model.load_state_dict(old.model.state_dict())
        want.ema.load_state_dict(old.ema.state_dict())
        assert got.opt.param_groups[0]["lr"] == (set_lr or lr)
        for s in (got, want):
            s(x, flip, t, 2, 0)
        for p, q in zip(got.params, want.params):
            assert torch.equal(p, q)


@pytest.mark.parametrize("cast_once", [False, True])
@pytest.mark.parametrize("how", ["assign", "data", "in_place"])
def test_step_trains_the_weights_given_to_its_model_afterwards(cast_once, how):
    # Weights put into step.model after the step was built, however, are the ones the next
    # step trains (cast_once's bf16 twin and the EMA included): the same bits as a step
    # built on those weights. A replaced parameter (assign=True) or one given new storage
    # (p.data = ...) left the step with the old ones.
    diff, x, t, flip = _step_setup()
    torch.manual_seed(0)
    m0 = UNet(resolution=16, **TINY)
    torch.manual_seed(1)
    m1 = UNet(resolution=16, **TINY)
    kw = dict(device="cpu", lr=1e-3, ema_beta=0.5, precision="bf16" if cast_once else "fp32")
    want = training.TrainStep(copy.deepcopy(m1), diff, **kw)
    got = training.TrainStep(copy.deepcopy(m0), diff, cast_once=cast_once, **kw)
    new = copy.deepcopy(m1.state_dict())
    if how == "assign":
        got.model.load_state_dict(new, assign=True)
        got.ema.load_state_dict(copy.deepcopy(new), assign=True)
    elif how == "data":
        for (name, p), q in zip(got.model.named_parameters(), m1.parameters()):
            p.data = q.detach().clone()
        for p, q in zip(got.ema.parameters(), m1.parameters()):
            p.data = q.detach().clone()
    else:
        got.model.load_state_dict(new)
        got.ema.load_state_dict(new)
    for s in (want, got):
        s(x, flip, t, 1, 0)
    for a, b in ((want.model, got.model), (want.ema, got.ema)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    assert all(p is q for p, q in zip(got.model.parameters(), got.params))


def test_step_sees_new_storage_given_to_any_one_parameter():
    # p.data = ... calls no hook: the step compares every parameter's data pointer with
    # its view of the flat buffer. One parameter given new storage, first, middle or last
    # (model or EMA), is found, its values put back into the buffer the EMA reads.
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    step = training.TrainStep(UNet(resolution=16, **TINY), diff, device="cpu")
    for watch, module in zip(step._watches, (step.model, step.ema)):
        params = list(module.parameters())
        assert not watch.stale()
        for i in (0, len(params) // 2, len(params) - 1):
            p = params[i]
            at, values = p.data_ptr(), p.detach().clone()
            p.data = torch.full_like(p, 0.5)
            assert watch.stale(), i
            watch.repair("model")
            assert not watch.stale() and p.data_ptr() == at
            assert torch.equal(p, torch.full_like(p, 0.5)) and not torch.equal(p, values)


@pytest.mark.parametrize("how", ["assign", "data"])
def test_every_step_sharing_a_model_trains_the_weights_assigned_to_it(how):
    # Two steps built on one model, the first stepped once: parameters then replaced in
    # the model (assign=True) or given new storage are the ones the first step trains
    # next, the same bits as a step whose model took those weights in place. The
    # registration hook told only the step built last: the first trained its old
    # parameters and left the assigned ones untouched.
    diff = BlurDiffusion(resolution=16)
    x = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(3))
    t, flip = torch.tensor([5, 50]), torch.zeros(2, dtype=torch.bool)
    torch.manual_seed(0)
    m0 = UNet(resolution=16, **TINY)
    torch.manual_seed(1)
    m1 = UNet(resolution=16, **TINY)
    kw = dict(device="cpu", lr=1e-3)
    shared = copy.deepcopy(m0)
    first = training.TrainStep(shared, diff, **kw)
    training.TrainStep(shared, diff, **kw)             # kept alive, built last
    want = training.TrainStep(copy.deepcopy(m0), diff, **kw)
    for s in (want, first):
        s(x, flip, t, 1, 0)
    if how == "assign":
        shared.load_state_dict(copy.deepcopy(m1.state_dict()), assign=True)
    else:
        for p, q in zip(shared.parameters(), m1.parameters()):
            p.data = q.detach().clone()
    want.model.load_state_dict(m1.state_dict())
    for s in (want, first):
        s(x, flip, t, 2, 0)
    assert not all(map(torch.equal, want.model.parameters(), m1.parameters()))    # trained
    for (name, p), q in zip(want.model.named_parameters(), shared.parameters()):
        assert torch.equal(p, q), name
    assert all(p is q for p, q in zip(shared.parameters(), first.params))


def test_a_dropped_step_is_not_kept_by_its_models_watch():
    # The watch of a model's parameters holds its steps weakly: a step dropped is freed
    # (with its optimizer state), and a later replacement tells the steps still alive.
    import gc
    import weakref
    diff = BlurDiffusion(resolution=16)
    torch.manual_seed(0)
    model = UNet(resolution=16, **TINY)
    kept = training.TrainStep(model, diff, device="cpu")
    dropped = training.TrainStep(model, diff, device="cpu")
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    assert kept._watches[0].stale()


def test_step_trains_a_model_left_in_eval_mode_with_dropout():
    # A model handed over (or switched) in eval mode trains in train mode, dropout on:
    # the same bits as the step of the same model in train mode, from the same seed.
    diff, x, t, flip = _step_setup()
    torch.manual_seed(0)
    model = UNet(resolution=16, dropout=0.5, **TINY)
    for cast_once in (False, True):
        kw = dict(device="cpu", lr=1e-2, precision="bf16", cast_once=cast_once)
        want = training.TrainStep(copy.deepcopy(model).train(), diff, **kw)
        no_dropout = copy.deepcopy(model)
        for m in no_dropout.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        off = training.TrainStep(no_dropout, diff, **kw)
        got = training.TrainStep(copy.deepcopy(model).eval(), diff, **kw)
        for _ in range(2):
            for s in (want, off, got):
                torch.manual_seed(7)
                s(x, flip, t, 1, 0)
            assert got.model.training
            got.model.eval()                # switched off between steps
        assert all(torch.equal(p, q) for p, q in zip(want.params, got.params))
        assert not all(torch.equal(p, q) for p, q in zip(want.params, off.params))


def test_train_takes_numpy_integers_and_writes_them_as_json_ints(made16, tmp_path):
    # numpy integers pass where ints do (they were refused) and go into config.json as
    # the ints they are; a numpy bool is still no bool.
    n = np.int64
    res = training.train(data=str(made16), out=str(tmp_path / "run"),
                         **{**KW, "steps": n(1), "batch_size": n(4), "seed": n(3),
                            "save_every": n(1), "log_every": n(1), "warmup": n(0)})
    assert res["step"] == 1
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["steps"], cfg["batch_size"], cfg["seed"], cfg["warmup"]) == (1, 4, 3, 0)
    with pytest.raises(TypeError, match="^flip: expected a bool"):
        training.train(data=str(made16), out=str(tmp_path / "run2"),
                       **{**KW, "steps": 1, "flip": np.bool_(True)})


def test_a_dropped_step_leaves_no_module_behind():
    # The registry of watched modules (weak keys) held its watches, which hold the
    # modules: every submodule of a dropped step's model and EMA stayed alive.
    import gc
    import weakref
    step = training.TrainStep(UNet(resolution=16, **TINY), BlurDiffusion(resolution=16),
                              device="cpu")
    refs = [weakref.ref(m) for m in (*step.model.modules(), *step.ema.modules())]
    del step
    gc.collect()
    assert all(r() is None for r in refs)


def test_resume_auto_into_a_folder_with_no_run_says_no_run_was_found(tmp_path, capsys):
    # `blurfast train --out MISTYPED --resume auto` said only "data: required (as --data
    # or in --config)": that --resume found no run there to take the data from went unsaid.
    from blurfast import cli
    for out in (tmp_path / "no_such_run", tmp_path):
        assert cli.main(["train", "--out", str(out), "--resume", "auto"]) == 2
        assert capsys.readouterr().err == (
            f"blurfast train: error: data: required (as --data or in --config): resume "
            f"'auto' found no run to continue in {str(out)!r} (no config.json); give the "
            f"run's directory as --out, or --data to start a new run\n")
    assert list(tmp_path.iterdir()) == []
    # without --resume the message stays as it was
    assert cli.main(["train", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ("blurfast train: error: data: required (as --data or "
                                       "in --config)\n")


def test_resume_from_a_path_that_does_not_exist_names_resume(made16, tmp_path, capsys):
    # A mistyped --resume CKPT said "checkpoint PATH: not a directory", naming neither
    # the argument nor what it takes.
    from blurfast import cli
    missing = tmp_path / "run" / "checkpoints" / "step_000000007"
    words = (f"resume: {str(missing)!r} does not exist; give 'auto' (the run's newest valid "
             f"checkpoint) or a checkpoint directory")
    assert cli.main(["train", "--data", str(made16), "--out", str(tmp_path / "run"),
                     "--resume", str(missing)]) == 2
    assert capsys.readouterr().err == f"blurfast train: error: {words}\n"
    with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
        training.train(data=str(made16), out=str(tmp_path / "run"), resume=str(missing),
                       steps=1, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_the_bar_shows_the_logs_images_per_second(made16, tmp_path, capsys, monkeypatch):
    # The bar rounded images/s to an int: a CPU run of under half an image a second
    # showed img_s=0 beside a log.csv row of 0.4. It shows the log's value now.
    import csv
    out = tmp_path / "r"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    training.train(data=str(made16), out=str(out), steps=2, **{**KW, "progress": True})
    err = capsys.readouterr().err
    shown = re.findall(r"img_s=([0-9.e+]+)", err)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert shown and shown[-1] == rows[-1]["images_per_s"], (shown, rows[-1])


def test_off_a_terminal_train_prints_a_line_per_log_row_not_a_bar(made16, tmp_path, capsys):
    # A batch job's log file got every redraw of the bar; it gets one line per log row,
    # with log.csv's values.
    import csv
    out = tmp_path / "r"
    training.train(data=str(made16), out=str(out), steps=3,
                   **{**KW, "progress": True, "log_every": 2})
    got = capsys.readouterr()
    assert "train:" not in got.err and "\r" not in got.err      # no bar
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    said = [line for line in got.out.splitlines() if line.startswith("step ")]
    assert said == [f"step {r['step']}/3: loss {float(r['loss']):.4f}, {r['images_per_s']} "
                    f"images/s, skipped {r['nonfinite']}, {r['elapsed_s']} s" for r in rows]
    assert [r["step"] for r in rows] == ["2", "3"]


def test_off_a_terminal_train_prints_each_fid_as_a_line(made16, tmp_path, capsys,
                                                       monkeypatch):
    # Without a bar (stderr no terminal) the FID points are printed too, as the bar
    # would have written them, the best so far beside each.
    _fids(monkeypatch, (5.0, 3.0, 4.0))
    training.train(data=str(made16), out=str(tmp_path / "r"), steps=3,
                   **{**KW, "progress": True, "fid_every": 1, "fid_ref": str(made16)})
    said = [line for line in capsys.readouterr().out.splitlines() if "FID" in line]
    assert said == ["step 1: FID 5.000 (best 5.000)", "step 2: FID 3.000 (best 3.000)",
                    "step 3: FID 4.000 (best 3.000)"]


def test_sample_grids_default_to_16_images_of_25_steps_on_a_cpu(made16, tmp_path, monkeypatch):
    # 64 images x 100 DDIM steps (the GPU default) made a 1-step CPU run's final grid take
    # over 10 minutes; on a CPU the default is 16 x 25, saved as the run used it.
    import json
    made = []
    real = training._save_samples
    monkeypatch.setattr(training, "_save_samples", lambda ema, diff, path, count, steps, *a, **k:
                        made.append((count, steps)) or real(ema, diff, path, count, steps,
                                                            *a, **k))
    kw = {k: v for k, v in KW.items() if k not in ("sample_count", "sample_steps")}
    out = tmp_path / "r"
    training.train(data=str(made16), out=str(out), steps=1, **kw)
    assert made == [(16, 25)]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["sample_count"], cfg["sample_steps"]) == (16, 25)
    assert (out / "samples" / "step_000000001.png").is_file()
