#!/usr/bin/env bash
# One device call for the wgpu backend on the H100 through Vulkan (run through the `run` tool
# from the repo root, with `carry: [".gl", "out/wgpu"]`):
#   adapter report + conformance suite on the GPU, `fp4moe bench kernels --backend wgpu`,
#   `fp4moe bench model --backend wgpu` on both synthetic models, and the PyTorch bf16 baseline of
#   the same MoE layer (tools/bench_torch_moe.py, when present), so every ratio is side by side.
#
# The device machine has no Vulkan loader: the carried .gl/*.deb (libvulkan1 and the GL
# dispatch libraries, downloaded once as the device README says) are unpacked into / first, and
# the NVIDIA ICD is named explicitly when the loader does not find it.
#
# Binaries are built here (the device has no Rust toolchain), stripped and copied to out/wgpu/
# (git-ignored):
#   cargo test -p fp4moe-wgpu --release --no-run  -> out/wgpu/conformance, out/wgpu/golden, out/wgpu/coop
#   cargo build --release -p fp4moe              -> out/wgpu/fp4moe
# STAGES selects parts (default: all but ab): "test golden kernels model profile torch ab".
# `ab` compares a previous build with this one in the same call (decode through Vulkan moves by
# up to 10 % between processes): copy the previous commit's fp4moe to out/wgpu/base_fp4moe
# first; it runs `bench model` on both models AB_ROUNDS times (default 2), alternating the two
# binaries, with AB_ARGS (default "--prefill 2048 --decode-tokens 128").
set -uo pipefail
OUT=${OUT:-/tmp/fp4moe-wgpu-out}
mkdir -p "$OUT"
BIN=out/wgpu
STAGES=${STAGES:-"test golden kernels model profile torch"}
LOG=$OUT/summary.log
: >"$LOG"
say() { echo "== $*" | tee -a "$LOG"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$ICD" ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    export VK_DRIVER_FILES=$ICD
fi
export WGPU_BACKEND=vulkan
say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
ls -la $BIN 2>&1 | tee -a "$LOG"

if has test; then
    say "conformance suite (wgpu, Vulkan)"
    timeout 300 $BIN/conformance --test-threads 4 2>&1 | tee "$OUT/conformance.log" |
        grep -E "ok in|skipped|panicked|test result|FAILED|failed" | tee -a "$LOG"
    if [ -x $BIN/coop ]; then
        say "cooperative matrices through naga (tests/coop.rs)"
        timeout 120 $BIN/coop --nocapture 2>&1 | grep -E "exact|skipped|panicked|test result" | tee -a "$LOG"
    fi
fi

if has golden; then
    say "golden models through wgpu (transformers logits, cache/batch paths, quantize-on-load)"
    FP4MOE_GOLDEN_DIR=$PWD/testdata/golden timeout 300 $BIN/golden --nocapture 2>&1 | tee "$OUT/golden.log" |
        grep -E "vs |test result|panicked|skipped" | tail -30 | tee -a "$LOG"
fi

if has kernels; then
    # With kernel timestamps on, the table adds each op's device time (device_us) to its wall
    # time with a wait after every run (time_us).
    say "FP4MOE_WGPU_TIMESTAMPS=1 fp4moe bench kernels --backend wgpu --tokens 1,8192"
    FP4MOE_WGPU_TIMESTAMPS=1 timeout 300 $BIN/fp4moe bench kernels --backend wgpu --tokens 1,8192 \
        --json "$OUT/bench_kernels.json" 2>&1 | tail -60 | tee -a "$LOG"
fi

if has model; then
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "fp4moe bench model --backend wgpu --synthetic $m"
        timeout 200 $BIN/fp4moe bench model --backend wgpu --synthetic $m --json "$OUT/bench_model_$m.json" 2>&1 |
            tail -30 | tee -a "$LOG"
    done
fi

if has profile; then
    # Device time per kernel from timestamp queries (each dispatch in its own timed pass).
    for m in qwen3-30b-a3b glm-4.7-flash; do
        say "FP4MOE_WGPU_TIMESTAMPS=1 fp4moe bench model --backend wgpu --synthetic $m"
        FP4MOE_WGPU_TIMESTAMPS=1 timeout 200 $BIN/fp4moe bench model --backend wgpu --synthetic $m \
            --decode-tokens 8 --json "$OUT/kernels_$m.json" 2>&1 | tail -60 | tee -a "$LOG"
    done
fi

if has ab; then
    say "A/B: base_fp4moe (previous build) against fp4moe, alternating (${AB_ARGS:=--prefill 2048 --decode-tokens 128})"
    for i in $(seq "${AB_ROUNDS:-2}"); do
        for m in qwen3-30b-a3b glm-4.7-flash; do
            for b in base_fp4moe fp4moe; do
                # shellcheck disable=SC2086 # AB_ARGS is a list of flags
                r=$(timeout 200 $BIN/$b bench model --backend wgpu --synthetic $m $AB_ARGS 2>&1 |
                    grep -E '^prefill|^decode \(|^host waits' | sed -E 's/ *\([0-9]+ (tokens|steps) in .*//' |
                    tr -s ' ' | paste -sd '|')
                echo "$b $m: $r" | tee -a "$LOG"
            done
        done
    done
fi

if has torch && [ -f tools/bench_torch_moe.py ]; then
    say "PyTorch bf16 baseline + ceilings"
    PYTHONUNBUFFERED=1 timeout 240 python3 tools/bench_torch_moe.py --json "$OUT/torch_moe.json" 2>&1 | tail -20 | tee -a "$LOG"
fi
say "done"
