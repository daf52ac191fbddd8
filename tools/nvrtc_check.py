#!/usr/bin/env python3
"""Compile every CUDA kernel file of the cuda backend with NVRTC, on a machine without a GPU.

The backend compiles these same files at run time (crates/cuda/src/device.rs) with the same
options, so a file that passes here compiles on the H100. Pinned to CUDA 13.0, the H100 driver's
version: a newer NVRTC could accept code the device's driver then rejects.

Setup (CPU-only CI):
    python3 -m pip install "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-nvdisasm==13.2.51"
    python3 tools/nvrtc_check.py            # exit status 1 if any file fails

Prints one line per kernel file (OK with the CUBIN size, or FAIL with the compiler log).

With nvdisasm (the wheel above) and sm_90a it also reads the SASS of the kernels in EARLY_LOADS:
each must issue a 16-byte weight load before its first `griddepcontrol.wait` (SASS ACQBULK).
ptxas is free to move loads that do not depend on the wait below it, and did so in every
decode product until the eighteenth session (crates/cuda/NOTES.md); nothing else would notice
a kernel change that lets it happen again, since only the speed changes.

It also checks that no kernel has its warpgroup MMAs serialized: ptxas, when it cannot prove a
wgmma's registers untouched while it runs, waits for every wgmma to finish before the next
(SASS: a `WARPGROUP.DEPBAR.LE gsb0, 0x0` per HGMMA), and NVRTC's log does not say so. The
twenty-seventh session lost 35 % of a MoE layer to that.
"""
import argparse
import ctypes
import glob
import os
import subprocess
import sys
import tempfile

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


# Kernels that request their first weights before waiting for the previous kernel (the
# decode products: crates/cuda/kernels/gemv.cu, `pdl_enter_after_loads`).
EARLY_LOADS = {
    "gemv.cu": [
        *(f"gemv_tc{three}_w{w}" for three in ("", "3") for w in (4, 8, 16)),
        "moe_down_tc",
        "head_cols_gemv",
        "head_rows_gemv",
        *(f"gemv_l{lpr}_m{m}" for lpr in (8, 16, 32) for m in (1, 4)),
        *(f"gemv_l{lpr}_m1_r1" for lpr in (8, 16, 32, 64, 128)),
    ],
}


def find_nvdisasm():
    for p in sys.path:
        exe = os.path.join(p, "nvidia", "cu13", "bin", "nvdisasm")
        if os.path.isfile(exe):
            return exe
    return None


def sass_bodies(nvdisasm, cubin):
    """Each kernel's SASS lines, by name."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    bodies, current = {}, None
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith(".text.") and s.endswith(":"):
            current = s[len(".text."):-1]
            bodies[current] = []
        elif current is not None:
            bodies[current].append(s)
    return bodies


def serialized_wgmma(bodies):
    """The kernels whose every warpgroup MMA is waited for before the next, as "name: reason"
    lines, and how many kernels issue wgmma at all."""
    bad, issuing = [], 0
    for name, body in sorted(bodies.items()):
        mmas = sum("HGMMA" in l for l in body)
        if not mmas:
            continue
        issuing += 1
        waits = sum("WARPGROUP.DEPBAR.LE gsb0, 0x0" in l for l in body)
        if waits >= mmas:
            bad.append(f"{name}: {waits} waits for no wgmma in flight, {mmas} wgmma")
    return bad, issuing


def late_loads(bodies, names):
    """The kernels among `names` with no 16-byte global load before their first ACQBULK (or
    missing from the cubin), as "name: reason" lines."""
    bad = []
    for name in names:
        body = bodies.get(name)
        if body is None:
            bad.append(f"{name}: not in the cubin")
            continue
        wait = next((i for i, l in enumerate(body) if "ACQBULK" in l), None)
        if wait is None:
            bad.append(f"{name}: no griddepcontrol.wait (ACQBULK)")
        elif not any("LDG" in l and ".128" in l for l in body[:wait]):
            bad.append(f"{name}: no 16-byte load before its wait")
    return bad


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
    cubin = b""
    if r == 0:
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, buf)
        cubin = buf.raw
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
    nvdisasm = find_nvdisasm() if args.arch == "sm_90a" else None
    if nvdisasm is None:
        print("early weight loads and wgmma pipelining: not checked (needs nvdisasm and sm_90a)")
    for f, tag, defines in jobs:
        ok, log, cubin = compile_file(nvrtc, f, args.arch, includes, defines)
        rel = os.path.relpath(f, ROOT) + tag
        if ok:
            print(f"OK   {rel} ({len(cubin)} bytes cubin)" + (f"\n{log}" if log else ""))
        else:
            failed += 1
            print(f"FAIL {rel}\n{log}")
            continue
        if not nvdisasm or tag:
            continue
        bodies = sass_bodies(nvdisasm, cubin)
        names = EARLY_LOADS.get(os.path.basename(f), [])
        if names:
            bad = late_loads(bodies, names)
            if bad:
                failed += 1
                print(f"FAIL {rel}: weight loads after the wait\n  " + "\n  ".join(bad))
            else:
                print(f"OK   {rel}: {len(names)} kernels request weights before their wait")
        bad, issuing = serialized_wgmma(bodies)
        if bad:
            failed += 1
            print(f"FAIL {rel}: serialized wgmma\n  " + "\n  ".join(bad))
        elif issuing:
            print(f"OK   {rel}: {issuing} kernels keep wgmma in flight")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
