"""Merge gpu_check.sh's bench.json, bench_extra.json, bench_variants.json, bench_cluster.json,
steps.json and steps_compile.json (in the folder given) into results/<card>-<date>.json there, in blurfast.bench's JSON
shape, with the goals of
issues 4 and 6 judged over all rows (``targets``); prints the name. A bench cut short by
its time limit leaves the rows it finished, marked ``"partial": true``, which is kept."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blurfast.bench import dumps, targets  # noqa: E402


def main(out: str) -> str:
    d = json.load(open(os.path.join(out, "bench.json")))
    for name in ("bench_extra.json", "bench_variants.json", "bench_cluster.json"):
        extra = os.path.join(out, name)
        if not os.path.exists(extra):
            continue
        e = json.load(open(extra))
        d["rows"] += e["rows"]
        d["skipped"] += e["skipped"]
        if e.get("partial"):     # a run cut short by its time limit: the rows it finished
            d["partial"] = True
    d["model_steps"] = []
    for name in ("steps.json", "steps_compile.json"):   # each with its own baseline rows
        steps = os.path.join(out, name)
        if os.path.exists(steps):
            rows = json.load(open(steps)).get("model_steps", [])
            d["model_steps"] += [dict(r, run=name[:-5]) for r in rows]
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
