// MoE routers, one warp per token: the elementwise parts spread over the lanes, every top-k a
// warp-wide argmax per pick (one thread per token left a decode step waiting on a serial loop of
// k * E iterations). The selection order, tie rule and the order of every sum follow the
// reference twin exactly (sums run on lane 0), so ids agree and weights agree to rounding of expf.
#include "common.cuh"

#define ROUTE_MAX_E 512
#define ROUTE_FULL 0xffffffffu

// Top k of row (ranks by rank_key, ties to the lower index, masked entries skipped) by a whole
// warp: each pick is the warp-wide best among the entries that rank
// after the previous pick. Every lane ends with the same sel.
__device__ void warp_select_top(const float* row, int e, int k, const bool* allowed, int* sel) {
    int lane = threadIdx.x & 31;
    float pk = __int_as_float(0x7f800000);
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float bk = 0.0f;
        int bi = -1;
        for (int i = lane; i < e; i += 32) {
            if (allowed && !allowed[i]) continue;
            float key = rank_key(row[i]);
            if (ranks_before(pk, pi, key, i) && (bi < 0 || ranks_before(key, i, bk, bi))) { bk = key; bi = i; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ok = __shfl_xor_sync(ROUTE_FULL, bk, o);
            int oi = __shfl_xor_sync(ROUTE_FULL, bi, o);
            if (oi >= 0 && (bi < 0 || ranks_before(ok, oi, bk, bi))) { bk = ok; bi = oi; }
        }
        if (lane == 0) sel[j] = bi < 0 ? 0 : bi;
        pk = bk;
        pi = bi;
    }
    __syncwarp();
}

#define SOFTMAX_WARPS 4

// grid ceil(n / SOFTMAX_WARPS), block SOFTMAX_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SOFTMAX_WARPS * 32)
route_softmax(const float* logits, u32* ids, float* weights, int n, int e, int k, int renormalize) {
    pdl_enter();
    __shared__ float sp[SOFTMAX_WARPS][ROUTE_MAX_E];
    __shared__ int ssel[SOFTMAX_WARPS][ROUTE_MAX_E];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int t = blockIdx.x * SOFTMAX_WARPS + wid;
    if (t >= n) return; // the whole warp: nothing below synchronises the block
    float* p = sp[wid];
    int* sel = ssel[wid];
    const float* row = logits + (size_t)t * e;
    float m = -__int_as_float(0x7f800000);
    for (int i = lane; i < e; i += 32) m = fmaxf(m, row[i]);
    m = warp_max(m);
    for (int i = lane; i < e; i += 32) p[i] = expf(row[i] - m);
    __syncwarp();
    float s = 0.0f;
    if (lane == 0)
        for (int i = 0; i < e; i++) s += p[i];
    s = __shfl_sync(ROUTE_FULL, s, 0);
    for (int i = lane; i < e; i += 32) p[i] /= s;
    __syncwarp();
    warp_select_top(p, e, k, 0, sel);
    if (lane == 0) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += p[sel[j]];
        for (int j = 0; j < k; j++) {
            ids[(size_t)t * k + j] = (u32)sel[j];
            weights[(size_t)t * k + j] = renormalize ? p[sel[j]] / sum : p[sel[j]];
        }
    }
}

#define SIGMOID_WARPS 2

// grid ceil(n / SIGMOID_WARPS), block SIGMOID_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SIGMOID_WARPS * 32)
route_sigmoid_grouped(const float* logits, const float* bias, u32* ids, float* weights, int n, int e, int k,
                      int n_group, int topk_group, int renormalize, float scale) {
    pdl_enter();
    __shared__ float ss[SIGMOID_WARPS][ROUTE_MAX_E], sb[SIGMOID_WARPS][ROUTE_MAX_E], sgs[SIGMOID_WARPS][ROUTE_MAX_E];
    __shared__ bool sallowed[SIGMOID_WARPS][ROUTE_MAX_E];
    __shared__ int ssel[SIGMOID_WARPS][ROUTE_MAX_E], skept[SIGMOID_WARPS][ROUTE_MAX_E], stwo[SIGMOID_WARPS][2];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int t = blockIdx.x * SIGMOID_WARPS + wid;
    if (t >= n) return;
    float *s = ss[wid], *b = sb[wid], *gs = sgs[wid];
    bool* allowed = sallowed[wid];
    int *sel = ssel[wid], *kept = skept[wid], *two = stwo[wid];
    const float* row = logits + (size_t)t * e;
    for (int i = lane; i < e; i += 32) {
        s[i] = 1.0f / (1.0f + expf(-row[i]));
        b[i] = s[i] + bias[i];
        allowed[i] = false;
    }
    __syncwarp();
    int per = e / n_group;
    int two_n = 2 < per ? 2 : per;
    // Group scores by the whole warp, group after group (one lane walking a group's entries
    // twice made this a chain of ~2000 dependent instructions: 12.7 us for GLM's single group).
    for (int g = 0; g < n_group; g++) {
        warp_select_top(b + g * per, per, two_n, 0, two);
        if (lane == 0) {
            float acc = 0.0f;
            for (int j = 0; j < two_n; j++) acc += b[g * per + two[j]];
            gs[g] = acc;
        }
        __syncwarp();
    }
    warp_select_top(gs, n_group, topk_group, 0, kept);
    for (int j = 0; j < topk_group; j++)
        for (int i = lane; i < per; i += 32) allowed[kept[j] * per + i] = true;
    __syncwarp();
    warp_select_top(b, e, k, allowed, sel);
    if (lane == 0) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += s[sel[j]];
        for (int j = 0; j < k; j++) {
            ids[(size_t)t * k + j] = (u32)sel[j];
            float w = renormalize ? s[sel[j]] / (sum + 1e-20f) : s[sel[j]];
            weights[(size_t)t * k + j] = w * scale;
        }
    }
}
