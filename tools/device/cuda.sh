#!/usr/bin/env bash
# One device call for the CUDA backend (run through the `run` tool from the repo root):
#   conformance suite + CUDA tests on the GPU, compute-sanitizer, `fp4moe bench kernels` and
#   `fp4moe bench model` on both synthetic models, and the PyTorch bf16 baseline with the copy
#   bandwidth and bf16 GEMM ceilings — all in one call so every ratio is measured side by side.
#
# Binaries are built on the CPU machine (the device has no Rust toolchain), stripped and copied
# into out/cuda/ (git-ignored; pass `carry: ["out/cuda"]`):
#   cargo test -p fp4moe-cuda --release --no-run   -> out/cuda/conformance, out/cuda/device, out/cuda/golden,
#                                                    out/cuda/graph
#   cargo build --release -p fp4moe               -> out/cuda/fp4moe
#   cargo build --release -p fp4moe-cuda --example bench_layers -> out/cuda/bench_layers
# Optionally the compiled kernels too, so the call's first process skips NVRTC (~1 min):
#   FP4MOE_CUDA_CACHE=out/cuda/cache target/release/examples/fill_cache sm_90a (needs NVRTC only)
# The cubins compress ~12x: two builds' worth (an A/B) fits the carry limit only as
# out/cuda/cache.txz (`tar cJf out/cuda/cache.txz -C out cuda/cache`), unpacked here.
# Three separate commands: with `--example`, cargo builds only that example, so adding
# `-p fp4moe` to the last one leaves a stale out/cuda/fp4moe (this voided four calls' A/Bs once).
# Logs and JSON land in $OUT (at most 8 files come back). STAGES selects parts:
#   STAGES="test golden sanitize torch layers kernels model sampling profile ncu trace autotune"
#   (default: all but sampling, ncu, trace and autotune; sampling times decode under several
#   sampling settings and the host's whole-row pick; autotune writes $OUT/autotune_<model>.json to compare with
#   configs/, ncu prints each kernel's GPU time in one decode step via tools/ncu_step.py, trace
#   each kernel's share of a replayed decode step, of every binary in TRACE_BINS). `profile` runs
#   `bench model --profile` (time per op kind; PROFILE_ARGS: more bench model flags). `layers` (the backend's own
#   MoE/GEMV timing, bench_layers) reads the copy and GEMM ceilings that `torch` measured.
#   `ab` compares a previous build with this one in the same call: copy the previous commit's
#   fp4moe and bench_layers to out/cuda/base_fp4moe and out/cuda/base_bench_layers first; it
#   runs `bench model` on both models AB_ROUNDS times (default 2) alternating the two binaries
#   (AB_BINS: other binaries under out/cuda, in order, e.g. "base_fp4moe mid_fp4moe fp4moe";
#   AB_MODELS: the synthetic models, default both),
#   then both bench_layers (LAYERS_ARGS="--decode" for the one-token shapes only).
set -uo pipefail
OUT=${OUT:-/tmp/fp4moe-cuda-out}
mkdir -p "$OUT"
BIN=out/cuda
STAGES=${STAGES:-"test golden sanitize torch layers kernels model profile"}
PREFILL=${PREFILL:-512}
LOG=$OUT/summary.log
: >"$LOG"
say() { echo "== $*" | tee -a "$LOG"; }
# The copy and bf16 GEMM ceilings `torch` measured in this call, as bench_layers' arguments.
ceilings() {
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["copy_bytes_per_s"], d["bf16_gemm_flops_per_s"])' "$OUT/torch_moe.json" 2>/dev/null
}
has() { [[ " $STAGES " == *" $1 "* ]]; }

# libcuda comes with the driver; NVRTC (and its builtins) from the toolkit or the pip wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
[ -f "$BIN/cache.txz" ] && [ ! -d "$BIN/cache" ] &&
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BIN/cache.txz" "$(dirname "$BIN")"
[ -d "$BIN/cache" ] && export FP4MOE_CUDA_CACHE="$PWD/$BIN/cache"
say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
ls -la $BIN 2>&1 | tee -a "$LOG"

if has test; then
    say "conformance suite (cuda)"
    timeout 300 $BIN/conformance --test-threads 4 2>&1 | tee "$OUT/conformance.log" | grep -E "ok in|skipped|panicked|test result|FAILED|failed" | tee -a "$LOG"
    say "cuda device tests"
    timeout 120 $BIN/device --nocapture --test-threads 1 2>&1 | tail -20 | tee -a "$LOG"
    say "decode graph replay vs op by op"
    timeout 120 $BIN/graph --nocapture 2>&1 | tail -8 | tee -a "$LOG"
fi

if has golden; then
    say "golden models on the GPU (transformers logits, cache/batch paths, quantize-on-load)"
    FP4MOE_GOLDEN_DIR=$PWD/testdata/golden timeout 300 $BIN/golden --nocapture 2>&1 | tee "$OUT/golden.log" | grep -E "rel err|vs |test result|panicked|skipped" | tail -40 | tee -a "$LOG"
fi

if has sanitize; then
    say "compute-sanitizer memcheck (whole conformance suite)"
    if command -v compute-sanitizer >/dev/null; then
        timeout 400 compute-sanitizer --tool memcheck --print-limit 20 $BIN/conformance --test-threads 1 ${SANITIZE_FILTER:-} \
            2>&1 | tail -60 | tee "$OUT/sanitizer.log" | tail -8 | tee -a "$LOG"
    else
        say "compute-sanitizer not found"
    fi
fi

if has kernels; then
    say "fp4moe bench kernels --backend cuda"
    timeout 240 $BIN/fp4moe bench kernels --backend cuda --json "$OUT/bench_kernels.json" 2>&1 | tail -60 | tee -a "$LOG"
fi

if has model; then
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "fp4moe bench model --backend cuda --synthetic $m"
        timeout 200 $BIN/fp4moe bench model --backend cuda --synthetic $m --prefill $PREFILL \
            --json "$OUT/bench_model_$m.json" 2>&1 | tail -30 | tee -a "$LOG"
        say "the same, decode op by op (FP4MOE_GRAPHS=0)"
        FP4MOE_GRAPHS=0 timeout 200 $BIN/fp4moe bench model --backend cuda --synthetic $m --prefill $PREFILL \
            2>&1 | grep -E "^decode" | tee -a "$LOG"
    done
fi

if has sampling; then
    # What a sampling setting costs a decode step: the host's whole-row pick timed on this
    # machine's CPU, then decode with each setting (greedy and top-k <= 64 reduce on the device;
    # temperature or top-p alone download the row and sample it on the host).
    say "fp4moe bench sampling (the host's pick from a whole row, this machine's CPU)"
    timeout 120 $BIN/fp4moe bench sampling --json "$OUT/bench_sampling.json" 2>&1 | tee -a "$LOG"
    for m in qwen3-30b-a3b glm-4.7-flash; do
        for s in "" "--temperature 1" "--temperature 1 --top-p 0.95" "--temperature 0.6 --top-k 20 --top-p 0.95"; do
            r=$(timeout 200 $BIN/fp4moe bench model --backend cuda --synthetic $m --prefill $PREFILL --decode-tokens 64 $s 2>&1 |
                grep -E '^decode \(' | sed -E 's/ *\([0-9]+ steps in [0-9.]+ s;/ (/')
            echo "$m: $r" | tee -a "$LOG"
        done
    done
fi

if has profile; then
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "fp4moe bench model --profile --backend cuda --synthetic $m"
        timeout 200 $BIN/fp4moe bench model --profile --backend cuda --synthetic $m --prefill $PREFILL ${PROFILE_LAYERS:+--layers $PROFILE_LAYERS} \
            --decode-tokens 8 ${PROFILE_ARGS:-} 2>&1 | tail -60 | tee -a "$LOG"
    done
fi

if has ncu; then
    # Per-kernel GPU time of one decode step (2 layers, context 2048, graphs off so each kernel is
    # its own launch); caches are not flushed between kernels (NCU_CACHE=all flushes them), as in
    # a running decode step.
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "ncu: kernels of one decode step, synthetic $m (2 layers)"
        FP4MOE_GRAPHS=0 timeout 250 ncu --clock-control none --cache-control ${NCU_CACHE:-none} --metrics gpu__time_duration.sum --csv \
            $BIN/fp4moe bench model --backend cuda --synthetic $m --layers 2 --prefill 2048 --decode-tokens 1 \
            >"$OUT/ncu_$m.csv" 2>/dev/null
        python3 tools/ncu_step.py "$OUT/ncu_$m.csv" 2>&1 | tail -60 | tee -a "$LOG"
    done
fi

if has trace; then
    # Each kernel's share of a replayed decode step, from the instants the kernels passed their
    # waits (FP4MOE_CUDA_TRACE=1, device.rs): what the graph really spends per kernel, PDL
    # overlap included, unlike ncu's isolated launches.
    # TRACE_BINS: the binaries under out/cuda to trace in turn (default fp4moe).
    for m in qwen3-30b-a3b glm-4.7-flash; do
        for b in ${TRACE_BINS:-fp4moe}; do
            say "replay timeline (FP4MOE_CUDA_TRACE=1) of $b, synthetic $m, context $PREFILL"
            FP4MOE_CUDA_TRACE=1 timeout 200 $BIN/$b bench model --backend cuda --synthetic $m --prefill $PREFILL \
                --decode-tokens 32 2>&1 | sed -n '/^decode (/p; /decode GPU kernels/,$p' | tee -a "$LOG"
        done
    done
fi

if has autotune; then
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "fp4moe autotune --backend cuda --model $m"
        timeout 200 $BIN/fp4moe autotune --backend cuda --model $m --out "$OUT/autotune_$m.json" 2>&1 | tail -30 | tee -a "$LOG"
    done
fi

if has torch; then
    say "PyTorch bf16 baseline + ceilings"
    PYTHONUNBUFFERED=1 timeout 240 python3 tools/bench_torch_moe.py --json "$OUT/torch_moe.json" 2>&1 | tail -20 | tee -a "$LOG"
fi
if has layers; then
    say "bench_layers (cuda backend: MoE layers, GEMV, GEMM)"
    CEIL=$(ceilings)
    timeout 240 $BIN/bench_layers $CEIL 2>&1 | tee "$OUT/bench_layers.jsonl" | tee -a "$LOG"
fi
if has ab; then
    say "A/B: base_fp4moe (previous build) against fp4moe, alternating, prefill $PREFILL"
    # AB_SAMPLING: `;`-separated bench model sampling flags, one run each (default: greedy).
    IFS=';' read -ra SETS <<<"${AB_SAMPLING:- }"
    for i in $(seq ${AB_ROUNDS:-2}); do
        for b in ${AB_BINS:-base_fp4moe fp4moe}; do
            for m in ${AB_MODELS:-qwen3-30b-a3b glm-4.7-flash}; do
                for s in "${SETS[@]}"; do
                    r=$(timeout 200 $BIN/$b bench model --backend cuda --synthetic $m --prefill $PREFILL --decode-tokens 64 $s 2>&1 |
                        grep -E '^prefill|^decode \(' | sed -E 's/ *\([0-9]+ tokens in .*//; s/ *\([0-9]+ steps in [0-9.]+ s;?/ (/' | tr -s ' ' | paste -sd '|')
                    echo "$b $m$s: $r" | tee -a "$LOG"
                done
            done
        done
    done
    CEIL=$(ceilings)
    [ -x $BIN/base_bench_layers ] || say "no base_bench_layers: layer timings skipped"
    [ -x $BIN/base_bench_layers ] && for b in base_bench_layers bench_layers; do
        say "$b ${LAYERS_ARGS:-}"
        timeout 240 $BIN/$b $CEIL ${LAYERS_ARGS:-} 2>&1 | tee "$OUT/$b.jsonl" | python3 -c '
import json, sys
for l in sys.stdin:
    try:
        d = json.loads(l)
    except ValueError:
        continue
    if "seconds" not in d:
        print(d)
        continue
    what = d.get("layer") or "%sx%s m%s %s" % (d.get("n"), d.get("k"), d.get("m"), d.get("x"))
    print(d.get("bench"), what, d.get("tokens", ""), d.get("path", ""), d.get("tile_rows", ""), "%.2f us" % (d["seconds"] * 1e6))' | tee -a "$LOG"
    done
fi
say "done"
