"""Pictures of a bench result: ``blurfast bench --plot``'s chart of the times a run
measured (:func:`plot`), and ``blurfast draw bench``'s chart of a GPU run against the goals
of issues 6 and 4 (:func:`goals_chart`, its numbers from :func:`goal_panels`).

Both draw on a matplotlib ``Figure`` of their own (no pyplot state) and write the PNG
whole or not at all."""
from __future__ import annotations

from typing import Optional

from .bench import SMALL_BATCH, TARGETS, TRAIN_STEP_SPEEDUP
from .viz import figure_class

__all__ = ["plot", "goal_panels", "goals_chart", "CHART_IMPLS"]

# goals_chart's kernel bars by default: blurfast against the peers of DESIGN.md section 4.
CHART_IMPLS = ("blurfast", "torch_fp32", "torch_fft", "cupy")


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def plot(result: dict, path) -> None:
    """Bar chart of the median times (log scale): one group per case and shape, one bar
    per implementation. Needs matplotlib; ValueError where ``result`` has no timed row
    (the chart would be empty)."""
    rows = result["rows"]
    if not rows:
        raise ValueError("result: no timed rows to plot (every row was skipped)")
    Figure = figure_class("--plot")

    def group(r):
        return f"{r['case']}\n{_shape(r['shape'])}"

    def label(r):                           # bfloat16 rows get their own bars
        d = r.get("dtype", "float32")
        return r["impl"] if d == "float32" else f"{r['impl']} {d}"

    groups = list(dict.fromkeys(group(r) for r in rows))
    impls = list(dict.fromkeys(label(r) for r in rows))
    width = 0.8 / max(1, len(impls))
    fig = Figure(figsize=(max(6, 1.3 * len(groups)), 4.5))
    ax = fig.subplots()
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for r in rows:
            if label(r) == impl:
                xs.append(groups.index(group(r)) + (j - (len(impls) - 1) / 2) * width)
                ys.append(r["median_us"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (µs, log scale)")
    ax.set_title(f"blurfast bench on {result.get('gpu') or result.get('device')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _first(rows, impl: str, shape: tuple, case: Optional[str] = None,
           dtype: Optional[str] = None) -> Optional[dict]:
    """The first row of ``impl`` at ``shape`` (and ``case``, ``dtype`` where given): a
    merged result may hold a row twice, from several bench runs, and the first counts, as
    in ``bench.targets``."""
    for r in rows:
        if (r["impl"] == impl and tuple(r["shape"]) == shape
                and case in (None, r["case"]) and dtype in (None, r.get("dtype", "float32"))):
            return r
    return None


def goal_panels(result: dict, impls=None, *, arg: str = "result") -> list:
    """The numbers :func:`goals_chart` draws, one dict per panel that has any:
    ``{title, ylabel, groups, series: {impl: [value or None per group]}, goals, log}``.

    1. share of copy bandwidth of the float32 kernel rows of issue 6's bandwidth goals
       (the goal: the share to reach);
    2. µs per call of every op at the paper's batch (goal: 12 µs);
    3. ms per training step of paper64 at 64 x 64, batch 16 and 64, for each step
       configuration timed (goal at batch 16: a fifth of the paper-style baseline's time,
       ``torch_default`` or, in runs before it existed, ``torch_fp32``).

    ``impls``: the kernel rows drawn in panels 1 and 2 (None: those of
    :data:`CHART_IMPLS` the result has). ValueError naming ``arg`` for a
    CPU result (the goals are a GPU's) or one without any row of the goals' cases, and
    naming ``impls`` for an implementation the result has no row of."""
    if result.get("device") != "cuda":
        raise ValueError(f"{arg}: a run on {result.get('device')!r}; the goals are for GPU runs "
                         f"(device cuda)")
    have = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    if impls is None:
        impls = [i for i in CHART_IMPLS if i in have]
    absent = [i for i in impls if i not in have]
    if absent:
        raise ValueError(f"impls: no rows of {absent} in {arg}; it has {have}")
    rows = result["rows"]
    panels = []
    kernel_panels = (
        ("issue 6: share of a device copy's bandwidth (float32)", "share of copy bandwidth",
         list(TARGETS), "copy_fraction", lambda key: TARGETS[key][0]),
        (f"issue 6: every op at the paper's batch {_shape(SMALL_BATCH[0])}",
         "µs per call (log scale)", [(c, SMALL_BATCH[0]) for c in ("dct2", "idct2",
                                                                  "q_sample", "sampler_step")],
         "median_us", lambda key: SMALL_BATCH[1]))
    for title, ylabel, keys, field, goal in kernel_panels:
        groups, series, goals = [], {i: [] for i in impls}, []
        for key in keys:
            found = {i: _first(rows, impl=i, case=key[0], shape=tuple(key[1]),
                               dtype="float32") for i in impls}
            if not any(found.values()):
                continue
            groups.append(f"{key[0]}\n{_shape(key[1])}")
            goals.append(goal(key))
            for i in impls:
                series[i].append(found[i][field] if found[i] else None)
        if groups:
            panels.append(dict(title=title, ylabel=ylabel, groups=groups, series=series,
                               goals=goals, log="log" in ylabel))
    steps = [r for r in result.get("model_steps", []) if r["case"] == "train_step"
             and r.get("preset") == "paper64" and tuple(r["shape"][1:]) == (3, 64, 64)]
    batches = sorted(dict.fromkeys(r["shape"][0] for r in steps))
    if batches:
        step_impls = list(dict.fromkeys(r["impl"] for r in steps))
        series = {i: [] for i in step_impls}
        goals = []
        for b in batches:
            for i in step_impls:
                r = _first(steps, impl=i, shape=(b, 3, 64, 64))
                series[i].append(r["ms_per_step"] if r else None)
            base = next((series[i][-1] for i in ("torch_default", "torch_fp32")
                         if i in series and series[i][-1] is not None), None)
            goals.append(base / TRAIN_STEP_SPEEDUP if b == 16 and base is not None else None)
        panels.append(dict(title="issue 4: the training step, paper64 at 64 x 64",
                           ylabel="ms per step", groups=[f"batch {b}" for b in batches],
                           series=series, goals=goals, log=False))
    if not panels:
        raise ValueError(f"{arg}: no rows of the goals' cases (kernels at "
                         f"{', '.join(sorted({_shape(s) for _, s in TARGETS}))} or "
                         f"{_shape(SMALL_BATCH[0])}, or paper64's training step)")
    return panels


def goals_chart(result: dict, path, impls=None, *, arg: str = "result") -> list:
    """A PNG at ``path`` of :func:`goal_panels`: grouped bars, each value written on its
    bar, each goal a dashed line across its group; titled with the card, torch and date.
    Returns the panels drawn. Needs matplotlib."""
    panels = goal_panels(result, impls, arg=arg)
    Figure = figure_class("draw bench")
    # one colour per implementation across the panels; widths by the groups they hold
    colour = {n: f"C{k}" for k, n in enumerate(dict.fromkeys(
        n for p in panels for n in p["series"]))}
    sizes = [max(4, len(p["groups"]) + 1) for p in panels]
    fig = Figure(figsize=(1.25 * sum(sizes) + 1, 4.8))
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=sizes)[0]
    for ax, p in zip(axes, panels):
        names = list(p["series"])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            pts = [(g + (j - (len(names) - 1) / 2) * width, v)
                   for g, v in enumerate(p["series"][name]) if v is not None]
            if not pts:
                continue
            bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=name,
                          color=colour[name])
            ax.bar_label(bars, labels=[_value(v, p["ylabel"]) for _, v in pts], fontsize=6,
                         padding=1)
        label = "goal"                      # in the legend once
        for g, goal in enumerate(p["goals"]):
            if goal is not None:
                ax.hlines(goal, g - 0.45, g + 0.45, colors="k", linestyles="--", lw=1.2,
                          label=label)
                label = None
        ax.set_xticks(range(len(p["groups"])))
        ax.set_xticklabels(p["groups"], fontsize=8)
        ax.set_ylabel(p["ylabel"], fontsize=8)
        ax.set_title(p["title"], fontsize=9)
        if p["log"]:
            ax.set_yscale("log")
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.get('gpu')} | torch {result.get('torch')} | driver "
                 f"{result.get('driver')} | {str(result.get('date'))[:10]}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return panels


def _value(v: float, ylabel: str) -> str:
    return f"{v:.0%}" if ylabel.startswith("share") else f"{v:.3g}"


def _save(fig, path) -> None:
    from .fileio import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
