#!/usr/bin/env python3
"""Write testdata/fp4/tables.json: the value of every E2M1, E8M0 and E4M3 code, and E2M1
rounding cases, as ml_dtypes computes them. The fp4 crate's tests compare against this file, so
the Rust definitions are checked against an independent implementation.

Run from the repo root:  pip install ml_dtypes==0.6.0 numpy && python3 tools/gen_fp4_tables.py
"""
import json
import math

import ml_dtypes
import numpy as np


def enc(v):
    # JSON has no NaN; spell it out so the Rust side can check NaN codes too.
    return "nan" if math.isnan(v) else float(v)


f4 = ml_dtypes.float4_e2m1fn
e2m1 = []
for code in range(16):
    # ml_dtypes stores float4 as one byte holding the code in the low nibble.
    e2m1.append(float(np.array([code], dtype=np.uint8).view(f4).astype(np.float32)[0]))

# Rounding: every multiple of 1/8 in [-8, 8] plus midpoints, through ml_dtypes' cast (RNE, saturating).
xs = sorted(set([i / 8 for i in range(-64, 65)] + [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -100.0]))
rounding = [[x, float(np.array([x], dtype=np.float32).astype(f4).astype(np.float32)[0])] for x in xs]

e8m0 = [enc(v) for v in np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)]
e4m3 = [enc(v) for v in np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)]

# E4M3 rounding of values between codes (RNE) — sampled on a log grid plus exact midpoints.
grid = sorted(set([float(v) for v in np.geomspace(1e-4, 500, 400).astype(np.float32)]
                  + [(a + b) / 2 for a, b in zip(e4m3[:126], e4m3[1:127])]))
e4m3_rounding = [[x, float(np.array([x], dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)[0])]
                 for x in grid if x <= 448]

out = {
    "generator": "tools/gen_fp4_tables.py",
    "ml_dtypes": ml_dtypes.__version__,
    "numpy": np.__version__,
    "e2m1": e2m1,
    "e2m1_rounding": rounding,
    "e8m0": e8m0,
    "e4m3": e4m3,
    "e4m3_rounding": e4m3_rounding,
}
with open("testdata/fp4/tables.json", "w") as f:
    json.dump(out, f, indent=0)
print("wrote testdata/fp4/tables.json")
