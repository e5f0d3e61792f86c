"""Merge gpu_check.sh's bench.json, bench_extra.json, bench_variants.json, bench_columns.json,
steps.json and steps64.json (those of them in the folder given) into results/<card>-<date>.json there, in
blurfast.bench's JSON shape, with the goals of issues 4 and 6 judged over all rows
(``targets``); prints the name. A bench cut short by its time limit leaves the rows it
finished, marked ``"partial": true``, which is kept. Each row (kernel, skipped, model step)
names its ``run`` (the file it came from: several runs time the same row), and ``runs``
holds each run's ``copy_gbps``, which its rows' ``copy_fraction`` is measured against, and
``"partial": true`` for a run cut short (also said on stderr).

Input that is not of that shape is refused (exit 1, one line naming the file and what is
wrong): a file that is not JSON, a header or a row without its keys, or files of another
machine (gpu, driver, torch or device differ: a stale file of an earlier session)."""
import os
import re
import sys

try:                  # the installed package (a source tree without its extension fails)
    from blurfast.bench import dumps, read_result, targets
    from blurfast.fileio import atomic_path
except ImportError:   # none installed: the source tree this script is in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from blurfast.bench import dumps, read_result, targets
    from blurfast.fileio import atomic_path


KERNEL_FILES = ("bench.json", "bench_extra.json", "bench_variants.json", "bench_columns.json")
STEP_FILES = ("steps.json", "steps64.json")    # each with its own baseline rows
SAME_MACHINE = ("gpu", "driver", "torch", "device")    # equal in every file merged


def load(path: str) -> dict:
    """The results dict of ``path``; SystemExit naming the file and what is wrong with it
    where it is not blurfast.bench's shape (STEP_FILES need their ``model_steps`` too)."""
    try:
        return read_result(path, path, steps=os.path.basename(path) in STEP_FILES)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def main(out: str) -> str:
    found = [n for n in KERNEL_FILES + STEP_FILES if os.path.exists(os.path.join(out, n))]
    if not found:
        raise SystemExit(f"no results in {out}: expected one of {KERNEL_FILES + STEP_FILES}")
    d = None
    for name in found:
        e = load(os.path.join(out, name))
        run = name[:-5]
        if d is None:            # the header (card, driver, torch, date) of the first file
            d = dict(e, rows=[], skipped=[], model_steps=[], runs={})
            d.pop("partial", None)
            first = name
        for k in SAME_MACHINE:
            if e[k] != d[k]:
                raise SystemExit(f"{out}: {name} has {k} {e[k]!r}, {first} {d[k]!r}: one "
                                 "results file holds the runs of one machine and software")
        d["runs"][run] = {"copy_gbps": e["copy_gbps"]}
        d["rows"] += [dict(r, run=run) for r in e.get("rows", [])]
        d["skipped"] += [dict(r, run=run) for r in e.get("skipped", [])]
        if name in STEP_FILES:
            d["model_steps"] += [dict(r, run=run) for r in e.get("model_steps", [])]
        if e.get("partial"):     # a run cut short by its time limit: the rows it finished
            d["partial"] = d["runs"][run]["partial"] = True
            print(f"partial: {name} was cut short, its finished rows only", file=sys.stderr)
    d["targets"] = targets(d)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", d.get("gpu", "gpu")).strip("-").lower()
    name = f"{gpu}-{d.get('date', '')[:10]}.json"
    with atomic_path(os.path.join(out, "results", name), suffix=".json") as tmp:
        tmp.write_text(dumps(d))
    return name


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit(f"FOLDER: expected one folder (gpu_check.sh's OUT), got "
                         f"{sys.argv[1:]}; usage: python scripts/merge_results.py FOLDER")
    print(main(sys.argv[1]))
