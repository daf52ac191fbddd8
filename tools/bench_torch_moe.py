#!/usr/bin/env python3
"""PyTorch bf16 baseline of the two MoE layers, plus the machine's ceilings, on one GPU.

Measured side by side with `fp4moe bench` in tools/device/cuda.sh so every ratio comes from one
machine in one call:
- copy bandwidth: a large device-to-device copy (bytes read + written / time);
- bf16 GEMM rate: an 8192^3 matmul on random data;
- the MoE layers in bf16 with `torch._grouped_mm` over tokens sorted by expert:
  Qwen3-30B-A3B: 128 experts top-8, 2048 -> 768 -> 2048;
  GLM-4.7-Flash: 64 experts top-4 + 1 shared expert, 2048 -> 1536 -> 2048;
  at 1 and 8192 tokens (and any --tokens given). Routing is random top-k (the router itself is
  not timed; sorting and the combine are).
Timing: CUDA events around each call after warm-up, median of --reps. Prints a table and writes
JSON (--json).
"""
import argparse
import json
import statistics

import torch


def timed(fn, reps, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def copy_bandwidth(reps):
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps)
    return 2 * n / t


def gemm_rate(reps):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, reps)
    return 2 * n**3 / t


class MoeLayer:
    def __init__(self, experts, top_k, hidden, inter, shared_inter):
        g = torch.Generator(device="cuda").manual_seed(0)
        s = 0.02
        self.e, self.k, self.h, self.i = experts, top_k, hidden, inter
        # [E, H, 2I] and [E, I, H]: the layouts torch._grouped_mm takes (x @ W per group).
        self.w_gu = (torch.randn(experts, hidden, 2 * inter, device="cuda", generator=g) * s).bfloat16()
        self.w_d = (torch.randn(experts, inter, hidden, device="cuda", generator=g) * s).bfloat16()
        self.shared = None
        if shared_inter:
            self.shared = (
                (torch.randn(hidden, 2 * shared_inter, device="cuda", generator=g) * s).bfloat16(),
                (torch.randn(shared_inter, hidden, device="cuda", generator=g) * s).bfloat16(),
            )

    def weight_bytes_touched(self, tokens, ids):
        used = torch.unique(ids).numel()
        b = used * (self.w_gu[0].numel() + self.w_d[0].numel()) * 2
        if self.shared:
            b += sum(w.numel() for w in self.shared) * 2
        return b

    def forward(self, x, ids, wts):
        n = x.shape[0]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.e)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // self.k]
        h = torch._grouped_mm(xs, self.w_gu, offs=offs)
        a = torch.nn.functional.silu(h[:, : self.i]) * h[:, self.i :]
        y = torch._grouped_mm(a, self.w_d, offs=offs)
        y = y * wts.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros(n * self.k, self.h, device="cuda", dtype=y.dtype)
        out[order] = y
        out = out.view(n, self.k, self.h).sum(1)
        if self.shared:
            hs = x @ self.shared[0]
            si = self.shared[1].shape[0]
            out = out + (torch.nn.functional.silu(hs[:, :si]) * hs[:, si:]) @ self.shared[1]
        return out


LAYERS = {
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768, shared_inter=0),
    "glm-4.7-flash": dict(experts=64, top_k=4, hidden=2048, inter=1536, shared_inter=1536),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 8192])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    res = {"device": dev, "torch": torch.__version__}
    res["copy_bytes_per_s"] = copy_bandwidth(args.reps)
    res["bf16_gemm_flops_per_s"] = gemm_rate(args.reps)
    print(f"device: {dev}, torch {torch.__version__}")
    print(f"copy bandwidth: {res['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    print(f"bf16 GEMM 8192^3: {res['bf16_gemm_flops_per_s'] / 1e12:.0f} TFLOP/s")
    res["moe"] = []
    print(f"{'layer':<16} {'tokens':>6} {'median':>10} {'bf16 bytes':>11} {'GB/s':>8} {'TFLOP/s':>8}")
    for name, cfg in LAYERS.items():
        layer = MoeLayer(**cfg)
        for n in args.tokens:
            g = torch.Generator(device="cuda").manual_seed(n)
            x = torch.randn(n, cfg["hidden"], device="cuda", generator=g).bfloat16()
            ids = torch.stack([torch.randperm(cfg["experts"], device="cuda", generator=g)[: cfg["top_k"]] for _ in range(n)]) if n <= 64 else \
                torch.argsort(torch.rand(n, cfg["experts"], device="cuda", generator=g), dim=1)[:, : cfg["top_k"]]
            wts = torch.softmax(torch.randn(n, cfg["top_k"], device="cuda", generator=g), dim=1)
            t = timed(lambda: layer.forward(x, ids, wts), args.reps)
            flops = 2 * n * cfg["top_k"] * 3 * cfg["hidden"] * cfg["inter"]
            if cfg["shared_inter"]:
                flops += 2 * n * 3 * cfg["hidden"] * cfg["shared_inter"]
            wb = layer.weight_bytes_touched(n, ids)
            row = dict(layer=name, tokens=n, seconds=t, weight_bytes_bf16=wb, flops=flops)
            res["moe"].append(row)
            print(f"{name:<16} {n:>6} {t * 1e6:>8.1f}us {wb / 1e6:>9.1f}MB {wb / t / 1e9:>8.0f} {flops / t / 1e12:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
