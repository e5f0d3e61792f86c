#!/usr/bin/env python
"""Fréchet distance of each sampler's samples to an exact Gaussian-mixture model.

The data is ``blurfast.testing.example_oracle`` (3 components, 3x16x16) under the
paper's process (linear noise 1e-4..0.02, quartic blur, sigma 0.4, sigma_max 0.15,
N = 1000); the model is the exact ``E[eps | x_t]``, so every difference from the
exact draws' distance is the sampler's error. Groups of rows run separately
(``--groups``, one JSON each under ``--out``) and ``--report`` joins them into
``<out>.md``.

    python scripts/oracle_fid.py --groups exact reverse_sde --out benchmarks/results/oracle_fid
    python scripts/oracle_fid.py --report --out benchmarks/results/oracle_fid
"""
import argparse
import glob
import json
import os
import time

import torch

from blurfast.diffusion import BlurDiffusion
from blurfast.sampling import eta_first, sample
from blurfast.testing import example_oracle

STEPS = (10, 25, 50, 100, 250)
# group -> (sampler, stochastic-first fraction or None, start, spacing); start "prior" | "exact"
# ("exact": x_{N-1} drawn from the true marginal, possible only with the oracle).
GROUPS = {
    "reverse_sde": ("reverse_sde", None, "prior", "uniform"),
    "ancestral": ("ancestral", None, "prior", "uniform"),
    "ddim": ("ddim", None, "prior", "uniform"),
    "ddim_exact_start": ("ddim", None, "exact", "uniform"),
    "ddim_stoch30": ("ddim", 0.3, "prior", "uniform"),
    "ddim_stoch30_quad": ("ddim", 0.3, "prior", "quadratic"),
    "exp2m": ("exp2m", None, "prior", "uniform"),
    "exp2m_stoch30": ("exp2m", 0.3, "prior", "uniform"),
    "exp2m_stoch30_quad": ("exp2m", 0.3, "prior", "quadratic"),
}


def weight_z(oracle, x):
    """Largest |w_hat - w| / sqrt(w (1 - w) / n) over components (labels: argmax posterior)."""
    n = x.shape[0]
    lab = oracle.responsibilities(x, torch.zeros(n, dtype=torch.int64)).argmax(1)
    w_hat = torch.bincount(lab, minlength=oracle.num_components).double() / n
    w = oracle.weights
    return float(((w_hat - w).abs() / torch.sqrt(w * (1 - w) / n)).max())


def run_group(group, n, seed, steps):
    diff = BlurDiffusion(resolution=16, channels=3, num_steps=1000)
    oracle = example_oracle(diff)
    shape = (n,) + diff.shape
    rows = []
    if group == "exact":
        for s in (1, 2):
            x = oracle.sample(n, seed=s).float()
            rows.append(dict(group=group, sampler=f"exact draws (seed {s})", steps=0,
                             fd=oracle.frechet_distance(x), weight_z=weight_z(oracle, x), sec=0.0))
        return rows
    sampler, frac, start, spacing = GROUPS[group]
    for st in ([None] if sampler == "reverse_sde" else steps):
        t0 = time.time()
        oracle.calls = 0
        kw = {}
        nsteps = diff.num_steps - 1 if st is None else st
        if frac is not None:
            kw["eta"] = eta_first(nsteps, frac)
        if start == "exact":
            kw["x_init"] = oracle.sample(n, seed=seed + 1, t=diff.num_steps - 1).float()
        x = sample(oracle, diff, shape, sampler=sampler, steps=st, spacing=spacing, seed=seed,
                   progress=False, **kw)
        label = sampler + (f", eta=1 on first {int(frac * 100)}%" if frac else "") + \
            (", exact start" if start == "exact" else "") + \
            (f", {spacing} spacing" if spacing != "uniform" else "")
        rows.append(dict(group=group, sampler=label, steps=oracle.calls,
                         fd=oracle.frechet_distance(x), weight_z=weight_z(oracle, x),
                         sec=time.time() - t0))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(out):
    rows = []
    for p in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(p) as f:
            rows += json.load(f)["rows"]
    order = ["exact"] + list(GROUPS)
    rows.sort(key=lambda r: (order.index(r["group"]), r["steps"]))
    meta = {}
    for p in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(p) as f:
            meta = json.load(f)["meta"]
    lines = [f"# Fréchet distance to the exact mixture ({meta.get('n')} samples, 3x16x16, "
             f"paper process, N = 1000)", "",
             "Model: the exact E[eps | x_t] of `blurfast.testing.example_oracle` (3 components). "
             "weight z: largest |w_hat - w| / sqrt(w(1-w)/n) over components. "
             f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}.", "",
             "| sampler | model calls | FD | weight z | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['fd']:.3f} | {r['weight_z']:.1f} | "
                     f"{r['sec']:.0f} |")
    text = "\n".join(lines) + "\n"
    tmp = out + ".md.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out + ".md")
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", nargs="*", default=[], choices=["exact"] + list(GROUPS))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="*", default=list(STEPS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/oracle_fid")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    for g in a.groups:
        rows = run_group(g, a.n, a.seed, a.steps)
        meta = dict(n=a.n, seed=a.seed, torch=torch.__version__,
                    machine=f"CPU, {a.threads} thread(s)")
        tmp = os.path.join(a.out, g + ".json.tmp")
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(tmp, os.path.join(a.out, g + ".json"))
    if a.report:
        report(a.out)


if __name__ == "__main__":
    main()
