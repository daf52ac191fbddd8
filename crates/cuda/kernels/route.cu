// MoE routers, one thread per token (E is at most a few hundred; n up to a prefill chunk).
// The selection order, tie rule and the order of every sum follow the reference twin exactly,
// so ids agree and weights agree to rounding of expf.
#include "common.cuh"

#define ROUTE_MAX_E 512

// Top k of row (ranks by rank_key, ties to the lower index), masked entries skipped.
__device__ void select_top(const float* row, int e, int k, const bool* allowed, int* sel) {
    float pk = __int_as_float(0x7f800000);
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float bk = 0.0f;
        int bi = -1;
        for (int i = 0; i < e; i++) {
            if (allowed && !allowed[i]) continue;
            float key = rank_key(row[i]);
            if (ranks_before(pk, pi, key, i) && (bi < 0 || ranks_before(key, i, bk, bi))) { bk = key; bi = i; }
        }
        sel[j] = bi < 0 ? 0 : bi;
        pk = bk;
        pi = bi;
    }
}

extern "C" __global__ void route_softmax(const float* logits, u32* ids, float* weights, int n, int e, int k,
                                         int renormalize) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float p[ROUTE_MAX_E];
    int sel[ROUTE_MAX_E];
    const float* row = logits + (size_t)t * e;
    float m = -__int_as_float(0x7f800000);
    for (int i = 0; i < e; i++) m = fmaxf(m, row[i]);
    float s = 0.0f;
    for (int i = 0; i < e; i++) { p[i] = expf(row[i] - m); s += p[i]; }
    for (int i = 0; i < e; i++) p[i] /= s;
    select_top(p, e, k, 0, sel);
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += p[sel[j]];
    for (int j = 0; j < k; j++) {
        ids[(size_t)t * k + j] = (u32)sel[j];
        weights[(size_t)t * k + j] = renormalize ? p[sel[j]] / sum : p[sel[j]];
    }
}

extern "C" __global__ void route_sigmoid_grouped(const float* logits, const float* bias, u32* ids,
                                                 float* weights, int n, int e, int k, int n_group,
                                                 int topk_group, int renormalize, float scale) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float s[ROUTE_MAX_E], b[ROUTE_MAX_E], gs[ROUTE_MAX_E];
    bool allowed[ROUTE_MAX_E];
    int sel[ROUTE_MAX_E];
    const float* row = logits + (size_t)t * e;
    for (int i = 0; i < e; i++) {
        s[i] = 1.0f / (1.0f + expf(-row[i]));
        b[i] = s[i] + bias[i];
    }
    int per = e / n_group;
    for (int g = 0; g < n_group; g++) {
        int two[2];
        select_top(b + g * per, per, 2 < per ? 2 : per, 0, two);
        float acc = 0.0f;
        for (int j = 0; j < (2 < per ? 2 : per); j++) acc += b[g * per + two[j]];
        gs[g] = acc;
    }
    int kept[ROUTE_MAX_E];
    select_top(gs, n_group, topk_group, 0, kept);
    for (int i = 0; i < e; i++) allowed[i] = false;
    for (int j = 0; j < topk_group; j++)
        for (int i = 0; i < per; i++) allowed[kept[j] * per + i] = true;
    select_top(b, e, k, allowed, sel);
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += s[sel[j]];
    for (int j = 0; j < k; j++) {
        ids[(size_t)t * k + j] = (u32)sel[j];
        float w = renormalize ? s[sel[j]] / (sum + 1e-20f) : s[sel[j]];
        weights[(size_t)t * k + j] = w * scale;
    }
}
