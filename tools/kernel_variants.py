#!/usr/bin/env python3
"""Kernel variants for a device call without rebuilding the binaries: compile a variant of one
kernel file with NVRTC here and store it under the cache name the runtime looks up for the
embedded source.

The CUDA backend keeps compiled kernels in a disk cache (`FP4MOE_CUDA_CACHE`), one CUBIN per
file, named by a hash of the source embedded in the binary (crates/cuda/src/device.rs,
`cache_file`). A variant compiled from an edited copy of that file (say, with a stage left out
under an `#ifdef`) and written under the same name is what the binary then loads. This is how
the twenty-fourth session timed "copies only", "no decode" and "no MMA" variants of the wgmma
GEMM in one call (crates/cuda/NOTES.md). The variants compute wrong results: they are for
timing only.

usage:
    kernel_variants.py CACHE_DIR CUBIN_NAME SOURCE.cu OUT_DIR DEFINE [DEFINE ...]

CACHE_DIR holds the binary's own cache (from `fill_cache`); CUBIN_NAME is the file in it to
replace (e.g. gemm-sm_90a-<hash>.cubin, the one `fill_cache` printed for gemm.cu); SOURCE.cu is
the edited kernel file; each DEFINE gives OUT_DIR/<DEFINE>/, a copy of CACHE_DIR with that
variant in place (run the binary with FP4MOE_CUDA_CACHE pointing there); `A+B` defines both.
Needs NVRTC as tools/nvrtc_check.py does.
"""
import ctypes
import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvrtc_check as nc  # noqa: E402


def main():
    if len(sys.argv) < 6:
        print(__doc__)
        return 2
    cache, cubin_name, src, out, defines = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    if not os.path.isfile(os.path.join(cache, cubin_name)):
        print(f"kernel_variants: {cubin_name} is not in {cache}", file=sys.stderr)
        return 2
    lib = nc.find_libnvrtc()
    for b in sorted(glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so*"))):
        if ".alt." not in b:
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(lib)
    includes = list(nc.INCLUDES) + [d for d in [nc.runtime_include()] if d]
    arch = cubin_name.split("-")[1]
    for d in defines:
        ok, log, cubin = nc.compile_file(nvrtc, src, arch, includes, tuple(d.split("+")))
        if not ok:
            print(f"FAIL {d}\n{log}")
            return 1
        dst = os.path.join(out, d)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(cache, dst)
        with open(os.path.join(dst, cubin_name), "wb") as f:
            f.write(cubin)
        print(f"OK   {d}: {dst}/{cubin_name} ({len(cubin)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
