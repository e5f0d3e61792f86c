"""Merge gpu_check.sh's bench.json, bench_extra.json, bench_variants.json, bench_columns.json,
steps.json and steps64.json (those of them in the folder given) into results/<card>-<date>.json there, in
blurfast.bench's JSON shape, with the goals of issues 4 and 6 judged over all rows
(``targets``); prints the name. A bench cut short by its time limit leaves the rows it
finished, marked ``"partial": true``, which is kept. Each row (kernel, skipped, model step)
names its ``run`` (the file it came from: several runs time the same row), and ``runs``
holds each run's ``copy_gbps``, which its rows' ``copy_fraction`` is measured against."""
import json
import os
import re
import sys

try:                  # the installed package (a source tree without its extension fails)
    from blurfast.bench import dumps, targets
except ImportError:   # none installed: the source tree this script is in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from blurfast.bench import dumps, targets


KERNEL_FILES = ("bench.json", "bench_extra.json", "bench_variants.json", "bench_columns.json")
STEP_FILES = ("steps.json", "steps64.json")    # each with its own baseline rows


def main(out: str) -> str:
    found = [n for n in KERNEL_FILES + STEP_FILES if os.path.exists(os.path.join(out, n))]
    if not found:
        raise SystemExit(f"no results in {out}: expected one of {KERNEL_FILES + STEP_FILES}")
    d = None
    for name in found:
        with open(os.path.join(out, name)) as f:
            e = json.load(f)
        run = name[:-5]
        if d is None:            # the header (card, driver, torch, date) of the first file
            d = dict(e, rows=[], skipped=[], model_steps=[], runs={})
            d.pop("partial", None)
        d["runs"][run] = {"copy_gbps": e.get("copy_gbps")}
        d["rows"] += [dict(r, run=run) for r in e.get("rows", [])]
        d["skipped"] += [dict(r, run=run) for r in e.get("skipped", [])]
        if name in STEP_FILES:
            d["model_steps"] += [dict(r, run=run) for r in e.get("model_steps", [])]
        if e.get("partial"):     # a run cut short by its time limit: the rows it finished
            d["partial"] = True
    d["targets"] = targets(d)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", d.get("gpu", "gpu")).strip("-").lower()
    name = f"{gpu}-{d.get('date', '')[:10]}.json"
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    path = os.path.join(out, "results", name)
    with open(path + ".tmp", "w") as f:
        f.write(dumps(d))
    os.replace(path + ".tmp", path)
    return name


if __name__ == "__main__":
    print(main(sys.argv[1]))
