// Causal attention for decode and prefill: one block per (query, head), each warp walking its
// share of the keys with an online softmax, the warps merged at the end in a fixed order
// (deterministic). Values are held in registers, ATT_MAX_DV_PER_LANE per lane.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_MAX_DV_PER_LANE 16 // value width up to 512 (MLA's latent)

// Merge the per-warp (max, sum, acc) states and write the normalised output row.
__device__ __forceinline__ void att_merge(float m, float l, const float* acc, int dv, float* out) {
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][ATT_MAX_DV_PER_LANE * 32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) { sm[wid] = m; sl[wid] = l; }
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) {
        int d = c * 32 + lane;
        if (d < dv) sacc[wid][d] = acc[c];
    }
    __syncthreads();
    float gm = -__int_as_float(0x7f800000);
    for (int w = 0; w < ATT_WARPS; w++) gm = fmaxf(gm, sm[w]);
    float gl = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) gl += sm[w] == -__int_as_float(0x7f800000) ? 0.0f : sl[w] * expf(sm[w] - gm);
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm[w] != -__int_as_float(0x7f800000)) v += sacc[w][d] * expf(sm[w] - gm);
        out[d] = v / gl;
    }
}

// Online-softmax step of one warp for score s and value row v.
__device__ __forceinline__ void att_step(float s, const float* v, int dv, float& m, float& l, float* acc) {
    int lane = threadIdx.x & 31;
    float nm = fmaxf(m, s);
    float corr = m == -__int_as_float(0x7f800000) ? 0.0f : expf(m - nm);
    float p = expf(s - nm);
    l = l * corr + p;
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) {
        int d = c * 32 + lane;
        if (d < dv) acc[c] = acc[c] * corr + p * v[d];
    }
    m = nm;
}

// q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]. grid (Hq, T).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_gqa_f32(const float* q, const float* k, const float* v, float* out, int hq, int hkv, int d, int dv,
                  int pos0, float scale) {
    int h = blockIdx.x, t = blockIdx.y;
    int kh = h / (hq / hkv);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const float* qh = q + ((size_t)t * hq + h) * d;
    int len = pos0 + t + 1;
    float m = -__int_as_float(0x7f800000), l = 0.0f, acc[ATT_MAX_DV_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) acc[c] = 0.0f;
    for (int j = wid; j < len; j += ATT_WARPS) {
        const float* kr = k + ((size_t)j * hkv + kh) * d;
        float s = 0.0f;
        for (int i = lane; i < d; i += 32) s += qh[i] * kr[i];
        s = warp_sum(s) * scale;
        att_step(s, v + ((size_t)j * hkv + kh) * dv, dv, m, l, acc);
    }
    att_merge(m, l, acc, dv, out + ((size_t)t * hq + h) * dv);
}

// Absorbed MLA: q_lat [T, H, L], q_rope [T, H, R], cache [S, L + R] -> out [T, H, L]. grid (H, T).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_mla_f32(const float* q_lat, const float* q_rope, const float* cache, float* out, int heads, int l_dim,
                  int r_dim, int pos0, float scale) {
    int h = blockIdx.x, t = blockIdx.y;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int w = l_dim + r_dim;
    const float* a = q_lat + ((size_t)t * heads + h) * l_dim;
    const float* b = q_rope + ((size_t)t * heads + h) * r_dim;
    int len = pos0 + t + 1;
    float m = -__int_as_float(0x7f800000), l = 0.0f, acc[ATT_MAX_DV_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) acc[c] = 0.0f;
    for (int j = wid; j < len; j += ATT_WARPS) {
        const float* row = cache + (size_t)j * w;
        float s1 = 0.0f, s2 = 0.0f;
        for (int i = lane; i < l_dim; i += 32) s1 += a[i] * row[i];
        for (int i = lane; i < r_dim; i += 32) s2 += b[i] * row[l_dim + i];
        float s = (warp_sum(s1) + warp_sum(s2)) * scale;
        att_step(s, row, l_dim, m, l, acc);
    }
    att_merge(m, l, acc, l_dim, out + ((size_t)t * heads + h) * l_dim);
}

// MLA's absorbed per-head products (see Backend::head_linear). x [M, H, Kx].
// Not transposed: y[m,h,r] = W[h*rph + row_start + r, :] . x[m,h,:], one warp per output.
extern "C" __global__ void head_linear_rows(W w, const float* x, float* y, int m_rows, int heads, int rph,
                                            int row_start, int row_count) {
    size_t wid = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    size_t total = (size_t)m_rows * heads * row_count;
    if (wid >= total) return;
    int r = (int)(wid % row_count);
    size_t mh = wid / row_count;
    int h = (int)(mh % heads);
    int wr = h * rph + row_start + r;
    const float* xh = x + mh * w.cols;
    float s = 0.0f;
    for (int kk = lane; kk < w.cols; kk += 32) s += w_at(w, wr, kk) * xh[kk];
    s = warp_sum(s);
    if (lane == 0) y[wid] = s;
}

// Transposed: y[m,h,k] = sum_r W[h*rph + row_start + r, k] * x[m,h,r], one thread per output,
// r summed in order as the reference does.
extern "C" __global__ void head_linear_cols(W w, const float* x, float* y, int m_rows, int heads, int rph,
                                            int row_start, int row_count) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)m_rows * heads * w.cols;
    if (idx >= total) return;
    int kk = (int)(idx % w.cols);
    size_t mh = idx / w.cols;
    int h = (int)(mh % heads);
    const float* xh = x + mh * row_count;
    float s = 0.0f;
    for (int r = 0; r < row_count; r++) s += w_at(w, h * rph + row_start + r, kk) * xh[r];
    y[idx] = s;
}
