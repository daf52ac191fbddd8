#!/usr/bin/env python3
"""Kernel times of the last decode step from an `ncu --csv --metrics gpu__time_duration.sum` log.

`tools/device/cuda.sh` (stage `ncu`) runs `fp4moe bench model` on a 2-layer synthetic model under
Nsight Compute with graphs off (so each kernel is its own launch) and calls this to print the
last step's kernels, which end with the lm_head GEMV. Note: ncu flushes the caches before each
kernel, so small, latency-bound kernels read longer than they run in a warm pipeline.

usage: ncu_step.py LOG.csv [--layers N]
"""
import csv
import sys


def main():
    path = sys.argv[1]
    rows = list(csv.DictReader(l for l in open(path) if l.startswith('"')))
    kernels = {}
    for r in rows:
        k = kernels.setdefault(int(r["ID"]), {"name": r["Kernel Name"], "grid": r.get("Grid Size", "")})
        if r["Metric Name"] == "gpu__time_duration.sum":
            k["ns"] = float(r["Metric Value"].replace(",", ""))
    ks = [kernels[i] for i in sorted(kernels)]
    # The last step runs from the kernel after the previous lm_head (the largest GEMV grid) to
    # the final one.
    heads = [i for i, k in enumerate(ks) if k["name"].startswith("gemv") and k["grid"] == ks[-1]["grid"]]
    start = heads[-2] + 1 if len(heads) >= 2 else 0
    step = ks[start:]
    total = sum(k["ns"] for k in step)
    print(f"{'kernel':<34} {'grid':>16} {'us':>8}")
    for k in step:
        print(f"{k['name'][:34]:<34} {k['grid']:>16} {k['ns'] / 1e3:8.2f}")
    by = {}
    for k in step:
        by[k["name"]] = by.get(k["name"], 0.0) + k["ns"]
    print(f"\n{len(step)} kernels, {total / 1e3:.1f} us; by kernel:")
    for name, ns in sorted(by.items(), key=lambda x: -x[1]):
        print(f"  {name[:40]:<40} {ns / 1e3:8.2f} us  {100 * ns / total:5.1f} %")


if __name__ == "__main__":
    main()
