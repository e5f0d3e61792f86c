"""Instruction counts of a CUDA kernel's phases, from its SASS (a development aid).

The fast kernels are phase programs (docs/kernels.md): each phase ends at a block barrier
(BAR.SYNC), so splitting a kernel's SASS at its barriers gives one segment per phase.
The passes are straight-line code, so a pass's static count is what each thread runs; a
2-D transform's two passes are one segment in a loop, run twice.

    nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -Icsrc -cubin \\
        -o /tmp/k.cubin csrc/cuda_fast_f32.cu
    nvdisasm -c /tmp/k.cubin > /tmp/k.sass
    python scripts/sass_phases.py /tmp/k.sass "plane_kernel<Geom<64, 1, true>, float>"

Every kernel whose demangled name (c++filt, without namespaces) contains all the given
substrings is listed. Per segment: all instructions, FP32 arithmetic (FFMA, FADD, FMUL), FP64
arithmetic, shared loads/stores, global loads/stores and local-memory (spill) accesses.
"""
import argparse
import collections
import re
import subprocess
import sys

_INSTR = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True)
        name = out.stdout.strip()
        for prefix in ("blurfast::plane::", "(anonymous namespace)::"):
            name = name.replace(prefix, "")
        return name
    except (OSError, subprocess.CalledProcessError):
        return name


def segments(body: str):
    seg, segs = collections.Counter(), []
    for line in body.split("\n"):
        m = _INSTR.match(line)
        if not m:
            continue
        seg[m.group(1)] += 1
        if m.group(1) == "BAR":
            segs.append(seg)
            seg = collections.Counter()
    segs.append(seg)
    return segs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sass", help="output of nvdisasm -c")
    p.add_argument("name", nargs="*", help="substrings of the demangled kernel name")
    p.add_argument("--min", type=int, default=30, help="hide segments shorter than this")
    a = p.parse_args(argv)
    text = open(a.sass).read()
    parts = re.split(r"//-+ \.text\.(\S+) -+", text)
    found = 0
    for i in range(1, len(parts), 2):
        name = demangle(parts[i])
        if not all(w in name for w in a.name):
            continue
        found += 1
        print(f"== {name}")
        for k, s in enumerate(segments(parts[i + 1])):
            total = sum(s.values())
            if total < a.min:
                continue
            fp32 = s["FFMA"] + s["FADD"] + s["FMUL"]
            fp64 = s["DFMA"] + s["DADD"] + s["DMUL"]
            print(f"  phase {k:2d}: {total:5d} instr, fp32 {fp32:5d}, fp64 {fp64:4d}, "
                  f"LDS {s['LDS']:4d} STS {s['STS']:4d} LDG {s['LDG']:3d} STG {s['STG']:3d} "
                  f"LDL {s['LDL']} STL {s['STL']}")
    if not found:
        print("no kernel matches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:      # output piped into head
        sys.exit(0)
