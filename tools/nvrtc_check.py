#!/usr/bin/env python3
"""Compile every CUDA kernel file of the cuda backend with NVRTC, on a machine without a GPU.

The backend compiles these same files at run time (crates/cuda/src/device.rs) with the same
options, so a file that passes here compiles on the H100. Pinned to CUDA 13.0, the H100 driver's
version: a newer NVRTC could accept code the device's driver then rejects.

Setup (CPU-only CI):
    python3 -m pip install "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
    python3 tools/nvrtc_check.py            # exit status 1 if any file fails

Prints one line per kernel file (OK with the CUBIN size, or FAIL with the compiler log).
"""
import argparse
import ctypes
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "cuda", "kernels")
# fp4.cuh is generated from the Rust E2M1 definition (fp4::codegen), sampling.cuh from the
# sampling weight's (fp4moe_ops::sampling); at run time the backend passes the same texts as
# NVRTC headers.
INCLUDES = [KERNELS, os.path.join(ROOT, "crates", "fp4", "generated"), os.path.join(ROOT, "crates", "ops", "generated")]


def find_libnvrtc():
    """libnvrtc.so.13 from the nvidia-cuda-nvrtc wheel, or the system's."""
    env = os.environ.get("NVRTC_LIB")
    if env:
        return env
    for p in sys.path:
        hits = sorted(glob.glob(os.path.join(p, "nvidia", "cu13", "lib", "libnvrtc.so*")))
        hits += sorted(glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[0]
    return "libnvrtc.so"


def runtime_include():
    """CUDA headers from the nvidia-cuda-runtime wheel (the kernels need none today; kept on the
    include path so that a kernel may include them without changing CI)."""
    for p in sys.path:
        d = os.path.join(p, "nvidia", "cu13", "include")
        if os.path.isdir(d):
            return d
    return None


def compile_file(nvrtc, path, arch, includes, defines=()):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    name = os.path.basename(path).encode()
    r = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None)
    if r != 0:
        return False, f"nvrtcCreateProgram error {r}", 0
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"-lineinfo"]
    opts += [b"-I" + d.encode() for d in includes]
    opts += [b"-D" + d.encode() for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    r = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    nvrtc.nvrtcGetProgramLog(prog, log)
    cubin = 0
    if r == 0:
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = size.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return r == 0, log.value.decode(errors="replace").strip(), cubin


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a", help="NVRTC --gpu-architecture (default sm_90a)")
    args = ap.parse_args()
    lib = find_libnvrtc()
    try:
        # libnvrtc dlopens its builtins by bare name; a wheel's lib dir is not on the loader's
        # path, so load them first, globally.
        for b in sorted(glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so*"))):
            if ".alt." not in b:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
        nvrtc = ctypes.CDLL(lib)
    except OSError as e:
        print(f"nvrtc_check: cannot load {lib}: {e}", file=sys.stderr)
        return 2
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    includes = list(INCLUDES)
    rt = runtime_include()
    if rt:
        includes.append(rt)
    files = sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    if not files:
        print(f"nvrtc_check: no .cu files under {KERNELS}", file=sys.stderr)
        return 2
    print(f"nvrtc {major.value}.{minor.value} ({lib}), arch {args.arch}")
    failed = 0
    # The replay-timeline instrumentation (FP4MOE_CUDA_TRACE, in common.cuh's wait) is shared by
    # every file: one file compiled with it checks it. The cap's value is the host's (device.rs).
    jobs = [(f, "", ()) for f in files]
    jobs.append((os.path.join(KERNELS, "elementwise.cu"), " (traced)", ("FP4MOE_TRACE_CAP=8192",)))
    for f, tag, defines in jobs:
        ok, log, cubin = compile_file(nvrtc, f, args.arch, includes, defines)
        rel = os.path.relpath(f, ROOT) + tag
        if ok:
            print(f"OK   {rel} ({cubin} bytes cubin)" + (f"\n{log}" if log else ""))
        else:
            failed += 1
            print(f"FAIL {rel}\n{log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
