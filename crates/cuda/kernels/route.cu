// MoE routers, one warp per token: the elementwise parts spread over the lanes, every top-k a
// warp-wide argmax per pick (one thread per token left a decode step waiting on a serial loop of
// k * E iterations). The selection order, tie rule and the order of every sum follow the
// reference twin exactly (sums run on lane 0), so ids agree and weights agree to rounding of expf.
#include "common.cuh"

#define ROUTE_MAX_E 512
#define ROUTE_FULL 0xffffffffu

// The warp's best (key, index) of the lanes' candidates (bi < 0: none), by ranks_before; every
// lane ends with it.
__device__ __forceinline__ void warp_best(float& bk, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ok = __shfl_xor_sync(ROUTE_FULL, bk, o);
        int oi = __shfl_xor_sync(ROUTE_FULL, bi, o);
        if (oi >= 0 && (bi < 0 || ranks_before(ok, oi, bk, bi))) {
            bk = ok;
            bi = oi;
        }
    }
}

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
        warp_best(bk, bi);
        if (lane == 0) sel[j] = bi < 0 ? 0 : bi;
        pk = bk;
        pi = bi;
    }
    __syncwarp();
}

// A rank key as an unsigned integer of the same order (ranks_before's, with -0 equal to +0), so a
// warp takes its maximum in one `redux.sync`; 0 is below every key (-inf maps to 0x007fffff).
__device__ __forceinline__ u32 rank_bits(float k) {
    const u32 u = __float_as_uint(k == 0.0f ? 0.0f : k);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Top k of the row this warp holds in registers (entry lane + 32 c as key[c] = rank_key(value),
// c < N; entries at or past e, or with ok[c] false, are not candidates), picked in rank order
// with ties to the lower index as warp_select_top. Every lane ends with the same sel. Each pick
// is a warp maximum of the keys' bits and a warp minimum of the indices holding it (two
// `redux.sync`), and the picked entry leaves its lane's candidates: a shuffle tree of (key,
// index) pairs per pick was a chain of ten shuffles, 8 of them per Qwen3 decode call. Reading
// the entries from shared memory at every pick, with the softmax's sums and the group scores
// around it, took 8.5 us per decode call (one warp, every step a dependent chain).
template <int N>
__device__ __forceinline__ void warp_top_regs(const float* key, const bool* ok, int e, int k, int* sel) {
    const int lane = threadIdx.x & 31;
    u32 kb[N];
#pragma unroll
    for (int c = 0; c < N; c++) kb[c] = lane + 32 * c < e && ok[c] ? rank_bits(key[c]) : 0u;
    for (int j = 0; j < k; j++) {
        u32 lb = 0u;
        int li = 0;
#pragma unroll
        for (int c = 0; c < N; c++) // strictly greater: the lane's lowest index among equal keys
            if (kb[c] > lb) {
                lb = kb[c];
                li = lane + 32 * c;
            }
        const u32 m = __reduce_max_sync(ROUTE_FULL, lb);
        const u32 bi = __reduce_min_sync(ROUTE_FULL, m != 0u && lb == m ? (u32)li : 0xffffffffu);
        if (lane == 0) sel[j] = m == 0u ? 0 : (int)bi; // none left: 0, as warp_select_top
#pragma unroll
        for (int c = 0; c < N; c++)
            if ((u32)(lane + 32 * c) == bi) kb[c] = 0u;
    }
    __syncwarp();
}

// Lane 0's sum of v[0 .. n) in index order (the reference's order), given to every lane.
__device__ __forceinline__ float lane0_sum(const float* v, int n) {
    float s = 0.0f;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll 8
        for (int i = 0; i < n; i++) s += v[i];
    }
    return __shfl_sync(ROUTE_FULL, s, 0);
}

#define SOFTMAX_WARPS 4

// One token per warp; N = entries per lane (e <= 32 N).
template <int N>
__device__ __forceinline__ void softmax_token(const float* row, float* p, int* sel, u32* ids, float* weights, int t,
                                              int e, int k, int renormalize) {
    const int lane = threadIdx.x & 31;
    float v[N], key[N];
    bool ok[N];
    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int c = 0; c < N; c++) {
        const int i = lane + 32 * c;
        v[c] = i < e ? row[i] : 0.0f;
        if (i < e) m = fmaxf(m, v[c]);
    }
    m = warp_max(m);
#pragma unroll
    for (int c = 0; c < N; c++) {
        const int i = lane + 32 * c;
        v[c] = expf(v[c] - m);
        if (i < e) p[i] = v[c];
    }
    __syncwarp();
    const float s = lane0_sum(p, e);
    __syncwarp(); // lane 0 is done reading p
#pragma unroll
    for (int c = 0; c < N; c++) {
        const int i = lane + 32 * c;
        v[c] /= s;
        if (i < e) p[i] = v[c];
        key[c] = rank_key(v[c]);
        ok[c] = true;
    }
    __syncwarp();
    warp_top_regs<N>(key, ok, e, k, sel);
    if (lane == 0) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += p[sel[j]];
        for (int j = 0; j < k; j++) {
            ids[(size_t)t * k + j] = (u32)sel[j];
            weights[(size_t)t * k + j] = renormalize ? p[sel[j]] / sum : p[sel[j]];
        }
    }
}

// grid ceil(n / SOFTMAX_WARPS), block SOFTMAX_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SOFTMAX_WARPS * 32)
route_softmax(const float* logits, u32* ids, float* weights, int n, int e, int k, int renormalize) {
    pdl_enter();
    __shared__ float sp[SOFTMAX_WARPS][ROUTE_MAX_E];
    __shared__ int ssel[SOFTMAX_WARPS][ROUTE_MAX_E];
    int wid = threadIdx.x >> 5;
    int t = blockIdx.x * SOFTMAX_WARPS + wid;
    if (t >= n) return; // the whole warp: nothing below synchronises the block
    const float* row = logits + (size_t)t * e;
    if (e <= 64) softmax_token<2>(row, sp[wid], ssel[wid], ids, weights, t, e, k, renormalize);
    else if (e <= 128) softmax_token<4>(row, sp[wid], ssel[wid], ids, weights, t, e, k, renormalize);
    else if (e <= 256) softmax_token<8>(row, sp[wid], ssel[wid], ids, weights, t, e, k, renormalize);
    else softmax_token<16>(row, sp[wid], ssel[wid], ids, weights, t, e, k, renormalize);
}

#define SIGMOID_WARPS 2

struct SigmoidSmem {
    float s[ROUTE_MAX_E], b[ROUTE_MAX_E], gs[ROUTE_MAX_E];
    bool allowed[ROUTE_MAX_E];
    int sel[ROUTE_MAX_E], kept[ROUTE_MAX_E], two[2];
};

template <int N>
__device__ __forceinline__ void sigmoid_token(const float* row, const float* bias, SigmoidSmem& sm, u32* ids,
                                              float* weights, int t, int e, int k, int n_group, int topk_group,
                                              int renormalize, float scale) {
    const int lane = threadIdx.x & 31;
    float key[N];
    bool ok[N];
#pragma unroll
    for (int c = 0; c < N; c++) {
        const int i = lane + 32 * c;
        float x = i < e ? row[i] : 0.0f, bi = i < e ? bias[i] : 0.0f;
        const float sv = 1.0f / (1.0f + expf(-x)), bv = sv + bi;
        if (i < e) {
            sm.s[i] = sv;
            sm.b[i] = bv;
        }
        key[c] = rank_key(bv);
        ok[c] = true;
    }
    __syncwarp();
    // Groups: only when some are dropped (GLM keeps its single group, and every expert stays a
    // candidate, so the group scores decide nothing there).
    if (topk_group < n_group) {
        const int per = e / n_group;
        const int two_n = 2 < per ? 2 : per;
        for (int i = lane; i < e; i += 32) sm.allowed[i] = false;
        // Group scores by the whole warp, group after group (one lane walking a group's entries
        // twice made this a chain of ~2000 dependent instructions: 12.7 us for one group).
        for (int g = 0; g < n_group; g++) {
            warp_select_top(sm.b + g * per, per, two_n, 0, sm.two);
            if (lane == 0) {
                float acc = 0.0f;
                for (int j = 0; j < two_n; j++) acc += sm.b[g * per + sm.two[j]];
                sm.gs[g] = acc;
            }
            __syncwarp();
        }
        warp_select_top(sm.gs, n_group, topk_group, 0, sm.kept);
        for (int j = 0; j < topk_group; j++)
            for (int i = lane; i < per; i += 32) sm.allowed[sm.kept[j] * per + i] = true;
        __syncwarp();
#pragma unroll
        for (int c = 0; c < N; c++) {
            const int i = lane + 32 * c;
            ok[c] = i < e && sm.allowed[i];
        }
    }
    warp_top_regs<N>(key, ok, e, k, sm.sel);
    if (lane == 0) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += sm.s[sm.sel[j]];
        for (int j = 0; j < k; j++) {
            ids[(size_t)t * k + j] = (u32)sm.sel[j];
            float w = renormalize ? sm.s[sm.sel[j]] / (sum + 1e-20f) : sm.s[sm.sel[j]];
            weights[(size_t)t * k + j] = w * scale;
        }
    }
}

// grid ceil(n / SIGMOID_WARPS), block SIGMOID_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SIGMOID_WARPS * 32)
route_sigmoid_grouped(const float* logits, const float* bias, u32* ids, float* weights, int n, int e, int k,
                      int n_group, int topk_group, int renormalize, float scale) {
    pdl_enter();
    __shared__ SigmoidSmem smem[SIGMOID_WARPS];
    int wid = threadIdx.x >> 5;
    int t = blockIdx.x * SIGMOID_WARPS + wid;
    if (t >= n) return;
    const float* row = logits + (size_t)t * e;
    SigmoidSmem& sm = smem[wid];
    if (e <= 64) sigmoid_token<2>(row, bias, sm, ids, weights, t, e, k, n_group, topk_group, renormalize, scale);
    else if (e <= 128) sigmoid_token<4>(row, bias, sm, ids, weights, t, e, k, n_group, topk_group, renormalize, scale);
    else if (e <= 256) sigmoid_token<8>(row, bias, sm, ids, weights, t, e, k, n_group, topk_group, renormalize, scale);
    else sigmoid_token<16>(row, bias, sm, ids, weights, t, e, k, n_group, topk_group, renormalize, scale);
}
