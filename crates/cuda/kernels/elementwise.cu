// Row-wise and elementwise ops: norms, RoPE, softmax, SwiGLU, data movement, casts, embedding.
// Each kernel computes exactly what the reference twin (crates/ops/src/reference.rs) does;
// only summation order may differ, within the conformance tolerances.
#include "common.cuh"

// One block per row: x / sqrt(mean(x^2) + eps) * w. Rows of up to NORM_REG * blockDim.x values
// are held in registers, their loads unrolled and all in flight: a strided loop over a single
// 2048-wide row (the decode norm) took 8 us, each load waiting on the one before. The weight is
// asked of L2 before the wait and loaded with x: loaded after the block sum, it added a DRAM
// latency to every decode norm (3.8 us per call in the replayed Qwen3 step).
#define NORM_REG 16
// The row's norm into y; with `b` non-null x + b first, that sum also written to `sum` (the
// residual add and the norm that reads it in one launch: Backend::add_rms_norm).
__device__ __forceinline__ void rms_norm_row(const float* __restrict__ x, const float* __restrict__ b,
                                             const float* __restrict__ w, float* __restrict__ sum,
                                             float* __restrict__ y, int d, float eps) {
    if (blockIdx.x == 0) prefetch_l2(w, (size_t)d * sizeof(float));
    pdl_enter();
    __shared__ float red[32];
    const size_t r0 = (size_t)blockIdx.x * d;
    const float* xr = x + r0;
    float* yr = y + r0;
    float s = 0.0f;
    if (d <= NORM_REG * (int)blockDim.x) {
        float v[NORM_REG], wv[NORM_REG];
#pragma unroll
        for (int c = 0; c < NORM_REG; c++) {
            int i = threadIdx.x + c * blockDim.x;
            v[c] = i < d ? xr[i] : 0.0f;
            if (b) v[c] += i < d ? b[r0 + i] : 0.0f;
            wv[c] = i < d ? w[i] : 0.0f;
        }
#pragma unroll
        for (int c = 0; c < NORM_REG; c++) s += v[c] * v[c];
        s = block_sum(s, red);
        float r = 1.0f / sqrtf(s / (float)d + eps);
#pragma unroll
        for (int c = 0; c < NORM_REG; c++) {
            int i = threadIdx.x + c * blockDim.x;
            if (i >= d) continue;
            if (b) sum[r0 + i] = v[c];
            yr[i] = wv[c] * (v[c] * r);
        }
        return;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i];
        if (b) {
            v += b[r0 + i];
            sum[r0 + i] = v;
        }
        s += v * v;
    }
    // Each thread reads back only the sums it wrote itself, so no barrier is needed before.
    const float* vr = b ? sum + r0 : xr;
    s = block_sum(s, red);
    float r = 1.0f / sqrtf(s / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = w[i] * (vr[i] * r);
}

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int d, float eps) {
    rms_norm_row(x, nullptr, w, nullptr, y, d, eps);
}

extern "C" __global__ void add_rms_norm_f32(const float* __restrict__ a, const float* __restrict__ b,
                                            const float* __restrict__ w, float* __restrict__ sum,
                                            float* __restrict__ y, int d, float eps) {
    rms_norm_row(a, b, w, sum, y, d, eps);
}

// Backend::moe_add_rms_norm at decode: the MoE's terms part [n, terms, d] (moe_down's products)
// summed in term order as moe_sum_terms sums them, added to a, that sum written and normed; the
// sum's own launch cost 2.3 us per Qwen3 decode layer. One block per row; each thread requests
// every term of its TERMS_NORM_REG elements at once (d <= TERMS_NORM_THREADS * TERMS_NORM_REG,
// terms <= TERMS_NORM_MAX: the host checks).
#define TERMS_NORM_THREADS 512
#define TERMS_NORM_REG 4
#define TERMS_NORM_MAX 16
extern "C" __global__ void __launch_bounds__(TERMS_NORM_THREADS)
    add_terms_rms_norm_f32(const float* __restrict__ a, const float* __restrict__ part, int terms,
                           const float* __restrict__ w, float* __restrict__ sum, float* __restrict__ y, int d,
                           float eps) {
    if (blockIdx.x == 0) prefetch_l2(w, (size_t)d * sizeof(float));
    pdl_enter();
    __shared__ float red[32];
    const size_t r0 = (size_t)blockIdx.x * d;
    const float* pr = part + (size_t)blockIdx.x * terms * d;
    float t[TERMS_NORM_MAX][TERMS_NORM_REG], v[TERMS_NORM_REG], wv[TERMS_NORM_REG];
#pragma unroll
    for (int c = 0; c < TERMS_NORM_REG; c++) {
        const int i = threadIdx.x + c * TERMS_NORM_THREADS;
        v[c] = i < d ? a[r0 + i] : 0.0f;
        wv[c] = i < d ? w[i] : 0.0f;
#pragma unroll
        for (int s = 0; s < TERMS_NORM_MAX; s++) t[s][c] = s < terms && i < d ? pr[(size_t)s * d + i] : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < TERMS_NORM_REG; c++) {
        float acc = t[0][c];
#pragma unroll
        for (int s = 1; s < TERMS_NORM_MAX; s++)
            if (s < terms) acc += t[s][c];
        v[c] += acc;
        ss += v[c] * v[c];
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
#pragma unroll
    for (int c = 0; c < TERMS_NORM_REG; c++) {
        const int i = threadIdx.x + c * TERMS_NORM_THREADS;
        if (i >= d) continue;
        sum[r0 + i] = v[c];
        y[r0 + i] = wv[c] * (v[c] * r);
    }
}

// One thread per (token, head, pair). inv_freq [dims/2] comes from the host, computed as the
// reference computes it. style 0 = NeoX (i, i + dims/2), 1 = interleaved (2i, 2i + 1).
extern "C" __global__ void rope_f32(const float* x, const u32* pos, const float* inv_freq, float* y, int n,
                                    int heads, int d, int offset, int dims, int style) {
    pdl_enter();
    int half = dims / 2;
    size_t total = (size_t)n * heads * half;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int i = (int)(idx % half);
    size_t th = idx / half; // token * heads + head
    int t = (int)(th / heads);
    const float* xh = x + th * d + offset;
    float* yh = y + th * d + offset;
    int ia = style == 0 ? i : 2 * i;
    int ib = style == 0 ? i + half : 2 * i + 1;
    float angle = (float)pos[t] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    float a = xh[ia], b = xh[ib];
    yh[ia] = a * c - b * s;
    yh[ib] = b * c + a * s;
}

// rms_norm_f32 then rope_f32 on every (token, head) row of x [n, H, D] (Backend::norm_rope,
// Qwen3's q and k), one warp per row: the row in registers for the norm, then in shared memory
// so each lane can read its element's rotation partner. Two launches fewer per layer.
// D <= 32 * NORM_ROPE_REG; `blk` is the block's index among the ceil(n * H / NORM_ROPE_WARPS)
// blocks of this x, of NORM_ROPE_WARPS * 32 threads.
#define NORM_ROPE_REG 8
#define NORM_ROPE_WARPS 4
__device__ __forceinline__ void norm_rope_rows(const float* x, const float* w, const u32* pos, const float* inv_freq,
                                               float* y, int rows, int heads, int d, float eps, int offset, int dims,
                                               int style, int blk) {
    // The norm weight and the frequencies are asked of L2 before the wait and loaded with x, the
    // position and each lane's frequencies (loaded after the warp sum, they were two more
    // dependent latencies per call).
    if (blk == 0) {
        prefetch_l2(w, (size_t)d * sizeof(float));
        prefetch_l2(inv_freq, (size_t)(dims / 2) * sizeof(float));
    }
    pdl_enter();
    __shared__ float normed[NORM_ROPE_WARPS][32 * NORM_ROPE_REG];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int r = blk * NORM_ROPE_WARPS + wid;
    if (r >= rows) return; // the whole warp; nothing below synchronises the block
    const float* xr = x + (size_t)r * d;
    const int half = dims / 2;
    const float p = (float)pos[r / heads];
    float v[NORM_ROPE_REG], wv[NORM_ROPE_REG], fr[NORM_ROPE_REG], s = 0.0f;
#pragma unroll
    for (int c = 0; c < NORM_ROPE_REG; c++) {
        const int i = lane + 32 * c, j = i - offset;
        // pair k = (ia, ib): NeoX (k, k + half), interleaved (2k, 2k + 1); i is ia or ib
        const int k = style == 0 ? (j < half ? j : j - half) : j >> 1;
        v[c] = i < d ? xr[i] : 0.0f;
        wv[c] = i < d ? w[i] : 0.0f;
        fr[c] = i < d && j >= 0 && j < dims ? inv_freq[k] : 0.0f;
        s += v[c] * v[c];
    }
    s = warp_sum(s);
    const float rs = 1.0f / sqrtf(s / (float)d + eps);
    float* nr = normed[wid];
#pragma unroll
    for (int c = 0; c < NORM_ROPE_REG; c++) {
        const int i = lane + 32 * c;
        if (i < d) nr[i] = wv[c] * (v[c] * rs);
    }
    __syncwarp();
    float* yr = y + (size_t)r * d;
#pragma unroll
    for (int c = 0; c < NORM_ROPE_REG; c++) {
        const int i = lane + 32 * c, j = i - offset;
        if (i >= d) break;
        if (j < 0 || j >= dims) {
            yr[i] = nr[i];
            continue;
        }
        const int k = style == 0 ? (j < half ? j : j - half) : j >> 1;
        const bool second = style == 0 ? j >= half : (j & 1);
        const int ia = offset + (style == 0 ? k : 2 * k), ib = offset + (style == 0 ? k + half : 2 * k + 1);
        float sn, cs;
        sincosf(p * fr[c], &sn, &cs);
        const float a = nr[ia], b = nr[ib];
        yr[i] = second ? b * cs + a * sn : a * cs - b * sn;
    }
}
// grid ceil(n * H / NORM_ROPE_WARPS).
extern "C" __global__ void __launch_bounds__(NORM_ROPE_WARPS * 32)
    norm_rope_f32(const float* x, const float* w, const u32* pos, const float* inv_freq, float* y, int rows, int heads,
                  int d, float eps, int offset, int dims, int style) {
    norm_rope_rows(x, w, pos, inv_freq, y, rows, heads, d, eps, offset, dims, style, blockIdx.x);
}
// Two x of the same head width at the same positions (Backend::norm_ropes: Qwen3's q and k) in
// one launch: blocks [0, blocks0) take x0, the rest x1. Apart, k's launch waited for q's (5.4 us
// for both in a replayed Qwen3 layer). Backend::norm_ropes_to_cache: y1 and vy are cache rows,
// moved by *shift rows of heads1 * d (a replayed graph's position), and the warp of x1's row r
// also copies v's row r to vy (v null: no copy); the separate copy launch cost 2.5 us per layer.
extern "C" __global__ void __launch_bounds__(NORM_ROPE_WARPS * 32)
    norm_rope2_f32(const float* x0, const float* w0, float* y0, int rows0, int heads0, float eps0, const float* x1,
                   const float* w1, float* y1, int rows1, int heads1, float eps1, int blocks0, const u32* pos,
                   const float* inv_freq, int d, int offset, int dims, int style, const u32* shift, const float* v,
                   float* vy) {
    const int b = blockIdx.x;
    if (b < blocks0) {
        norm_rope_rows(x0, w0, pos, inv_freq, y0, rows0, heads0, d, eps0, offset, dims, style, b);
        return;
    }
    const size_t moved = (size_t)*shift * heads1 * d;
    const int r = (b - blocks0) * NORM_ROPE_WARPS + (threadIdx.x >> 5), i0 = (threadIdx.x & 31) * 4;
    // v's row (d % 4 == 0, d <= 256: two float4 per lane at most), an earlier kernel's output,
    // requested before the norm's chain and stored after it.
    float4 v0 = {}, v1 = {};
    const bool copy = v && r < rows1;
    if (copy) {
        pdl_enter();
        const float* vr = v + (size_t)r * d;
        if (i0 < d) v0 = *reinterpret_cast<const float4*>(vr + i0);
        if (i0 + 128 < d) v1 = *reinterpret_cast<const float4*>(vr + i0 + 128);
    }
    norm_rope_rows(x1, w1, pos, inv_freq, y1 + moved, rows1, heads1, d, eps1, offset, dims, style, b - blocks0);
    if (copy) {
        float* vo = vy + moved + (size_t)r * d;
        if (i0 < d) *reinterpret_cast<float4*>(vo + i0) = v0;
        if (i0 + 128 < d) *reinterpret_cast<float4*>(vo + i0 + 128) = v1;
    }
}

// Backend::split_rope, one block per (token, head) row of x [n, H, d]: first [.., a] = x[.., :a]
// (times w / rms when w is non-null), rest [.., d - a] = rope(x[.., a:]) on its dims offset ..
// offset + dims. Rows of up to SPLIT_ROPE_REG * SPLIT_ROPE_THREADS values, loaded at once into
// registers and shared memory (each rotated value reads its partner there). GLM's query heads
// and its kv row: two slices, a norm and a rotation were four launches for the kv row alone.
#define SPLIT_ROPE_THREADS 128
#define SPLIT_ROPE_REG 8
// One split_rope input: x [n, heads, d] in `blocks` rows, its parts' outputs with their row
// strides, moved by *shift rows (cache rows; the zero shift otherwise). SplitPart in backend.rs.
struct SplitPart {
    const float* x;
    const float* w;
    float* first;
    float* rest;
    const u32* shift;
    float eps;
    int heads, d, a, first_stride, rest_stride, blocks;
};

__device__ __forceinline__ void split_rope_row(const SplitPart& sp, int r, const u32* __restrict__ pos,
                                               const float* __restrict__ inv_freq, int offset, int dims, int style) {
    __shared__ float red[32];
    __shared__ float row[SPLIT_ROPE_THREADS * SPLIT_ROPE_REG];
    const int half = dims / 2, d = sp.d, a = sp.a;
    const float* __restrict__ w = sp.w;
    const float* xr = sp.x + (size_t)r * d;
    float* first = sp.first + (size_t)*sp.shift * sp.first_stride + (size_t)r * sp.first_stride;
    float* rest = sp.rest + (size_t)*sp.shift * sp.rest_stride + (size_t)r * sp.rest_stride;
    const float p = (float)pos[r / sp.heads];
    float v[SPLIT_ROPE_REG], f[SPLIT_ROPE_REG], s = 0.0f;
#pragma unroll
    for (int c = 0; c < SPLIT_ROPE_REG; c++) {
        const int i = threadIdx.x + SPLIT_ROPE_THREADS * c, j = i - a - offset;
        v[c] = i < d ? xr[i] : 0.0f;
        // first part: the norm weight; rotated dims: the pair's frequency (pairs as in norm_rope_rows)
        const int k = style == 0 ? (j < half ? j : j - half) : j >> 1;
        f[c] = i < a ? (w ? w[i] : 1.0f) : (i < d && j >= 0 && j < dims ? inv_freq[k] : 0.0f);
        if (i < a) s += v[c] * v[c];
        row[i] = v[c];
    }
    float rs = 1.0f;
    if (w) rs = 1.0f / sqrtf(block_sum(s, red) / (float)a + sp.eps); // block_sum's barriers publish `row`
    else __syncthreads();
#pragma unroll
    for (int c = 0; c < SPLIT_ROPE_REG; c++) {
        const int i = threadIdx.x + SPLIT_ROPE_THREADS * c, j = i - a - offset;
        if (i >= d) break;
        if (i < a) {
            first[i] = w ? f[c] * (v[c] * rs) : v[c];
            continue;
        }
        float y = v[c];
        if (j >= 0 && j < dims) {
            const int k = style == 0 ? (j < half ? j : j - half) : j >> 1;
            const bool second = style == 0 ? j >= half : (j & 1);
            const int ia = a + offset + (style == 0 ? k : 2 * k), ib = a + offset + (style == 0 ? k + half : 2 * k + 1);
            float sn, cs;
            sincosf(p * f[c], &sn, &cs);
            y = second ? row[ib] * cs + row[ia] * sn : row[ia] * cs - row[ib] * sn;
        }
        rest[i - a] = y;
    }
}

// Blocks [0, p0.blocks) take p0's rows, the rest p1's (p1.blocks = 0: one input). Two inputs:
// MLA's query heads and its kv row into the cache (Backend::split_rope_and_cache), whose
// separate launch cost ~3 us per GLM decode layer.
extern "C" __global__ void __launch_bounds__(SPLIT_ROPE_THREADS)
    split_rope_f32(SplitPart p0, SplitPart p1, const u32* __restrict__ pos, const float* __restrict__ inv_freq,
                   int offset, int dims, int style) {
    const bool second = (int)blockIdx.x >= p0.blocks;
    const SplitPart sp = second ? p1 : p0;
    if (blockIdx.x == 0 || (int)blockIdx.x == p0.blocks) {
        if (sp.w) prefetch_l2(sp.w, (size_t)sp.a * sizeof(float));
        prefetch_l2(inv_freq, (size_t)(dims / 2) * sizeof(float));
    }
    pdl_enter();
    split_rope_row(sp, second ? blockIdx.x - p0.blocks : blockIdx.x, pos, inv_freq, offset, dims, style);
}

// Copies the dims RoPE leaves alone (the kernel above writes only the roped ones).
extern "C" __global__ void rope_passthrough_f32(const float* x, float* y, size_t rows, int d, int offset,
                                                int dims) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * d) return;
    int c = (int)(idx % d);
    if (c < offset || c >= offset + dims) y[idx] = x[idx];
}

// One block per row, max-subtracted.
extern "C" __global__ void softmax_f32(const float* x, float* y, int d) {
    pdl_enter();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(xr[i] - m);
    s = block_sum(s, red);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = expf(xr[i] - m) / s;
}

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, size_t n) {
    pdl_enter();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a[i] + b[i];
}

// [rows, 2I] -> [rows, I]: silu(gate) * up.
extern "C" __global__ void silu_mul_f32(const float* x, float* y, size_t rows, int inter) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * inter) return;
    size_t r = idx / inter;
    int j = (int)(idx % inter);
    const float* xr = x + r * 2 * inter;
    y[idx] = silu_f(xr[j]) * xr[inter + j];
}

// dst[(row0 + *row_shift + r) * dst_cols + col0 + c] = src[r * src_stride + src_col0 + c] for
// r < rows, c < cols, elements of 2 or 4 bytes; destination rows past dst_rows are not written.
// Serves slice_cols, write_rows (whose row0 a replayed graph shifts: Backend::replay) and row
// padding. The host's `Copy2d` (src/backend.rs) has this layout.
struct Copy2d {
    const void* src;
    void* dst;
    size_t rows, row0, dst_rows;
    int cols, src_stride, src_col0, dst_cols, col0, pad_;
};

template <typename E>
__device__ __forceinline__ void copy2d_at(const Copy2d& a, const unsigned* row_shift, size_t idx) {
    if (idx >= a.rows * a.cols) return;
    size_t r = idx / a.cols;
    int c = (int)(idx % a.cols);
    size_t dr = a.row0 + *row_shift + r;
    if (dr < a.dst_rows) ((E*)a.dst)[dr * a.dst_cols + a.col0 + c] = ((const E*)a.src)[r * a.src_stride + a.src_col0 + c];
}

// One copy, or two in one launch (blockIdx.y picks; Backend::write_rows_many: a layer's two
// cache writes), the grid sized for the larger.
#define COPY2D(E, NAME)                                                                                          \
    extern "C" __global__ void NAME(Copy2d a, const unsigned* row_shift) {                                        \
        pdl_enter();                                                                                             \
        copy2d_at<E>(a, row_shift, (size_t)blockIdx.x * blockDim.x + threadIdx.x);                               \
    }                                                                                                            \
    extern "C" __global__ void NAME##_pair(Copy2d a, Copy2d b, const unsigned* row_shift) {                      \
        pdl_enter();                                                                                             \
        copy2d_at<E>(blockIdx.y == 0 ? a : b, row_shift, (size_t)blockIdx.x * blockDim.x + threadIdx.x);         \
    }
COPY2D(u32, copy2d_u32)
COPY2D(u16, copy2d_u16)

// Casts: CAST_PER_THREAD elements per thread, 16-byte accesses where the run is whole (one
// element per thread ran at ~0.8 TB/s, ~6 % of a bf16 prefill in casts). x and y start 16-byte
// aligned (device allocations).
#define CAST_PER_THREAD 8
extern "C" __global__ void cast_f32_bf16(const float* x, u16* y, size_t n) {
    pdl_enter();
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * CAST_PER_THREAD;
    if (i + CAST_PER_THREAD <= n) {
        float4 a = *reinterpret_cast<const float4*>(x + i), b = *reinterpret_cast<const float4*>(x + i + 4);
        auto pair = [](float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); };
        *reinterpret_cast<uint4*>(y + i) = make_uint4(pair(a.x, a.y), pair(a.z, a.w), pair(b.x, b.y), pair(b.z, b.w));
    } else {
        for (; i < n; i++) y[i] = f32_to_bf16(x[i]);
    }
}

// In place: x[i] rounded to bf16 and read back as f32. The MoE intermediate with bf16 x, on the
// paths whose products read it as f32 (Backend::moe rounds it).
extern "C" __global__ void round_bf16_f32(float* x, size_t n) {
    pdl_enter();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

extern "C" __global__ void cast_bf16_f32(const u16* x, float* y, size_t n) {
    pdl_enter();
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * CAST_PER_THREAD;
    if (i + CAST_PER_THREAD <= n) {
        uint4 a = *reinterpret_cast<const uint4*>(x + i);
        const u32 w[4] = {a.x, a.y, a.z, a.w};
        float f[CAST_PER_THREAD];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            f[2 * j] = __uint_as_float(w[j] << 16);
            f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
        *reinterpret_cast<float4*>(y + i) = make_float4(f[0], f[1], f[2], f[3]);
        *reinterpret_cast<float4*>(y + i + 4) = make_float4(f[4], f[5], f[6], f[7]);
    } else {
        for (; i < n; i++) y[i] = bf16_to_f32(x[i]);
    }
}

// Activations [rows, k] (f32 if in_bf16 == 0, else bf16) -> [rows, kp] with zeros in the pad,
// as f32 (GEMV input) or bf16 (tensor-core GEMM input).
extern "C" __global__ void pad_rows_to_f32(const void* x, int in_bf16, float* y, size_t rows, int k, int kp) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * kp) return;
    size_t r = idx / kp;
    int c = (int)(idx % kp);
    float v = 0.0f;
    if (c < k) v = in_bf16 ? bf16_to_f32(((const u16*)x)[r * k + c]) : ((const float*)x)[r * k + c];
    y[idx] = v;
}

extern "C" __global__ void pad_rows_to_bf16(const void* x, int in_bf16, u16* y, size_t rows, int k, int kp) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * kp) return;
    size_t r = idx / kp;
    int c = (int)(idx % kp);
    u16 v = 0;
    if (c < k) v = in_bf16 ? ((const u16*)x)[r * k + c] : f32_to_bf16(((const float*)x)[r * k + c]);
    y[idx] = v;
}

// f32 activations [rows, k] -> zero-padded bf16 terms [rows, kp] whose sum is x: t0 = bf16(x),
// t1 = bf16(x - t0), t2 = bf16(x - t0 - t1) (t2 == 0: two terms), for the tensor-core GEMM
// (see gemm.cu). The differences are exact in f32 (Sterbenz), so only the last term rounds.
extern "C" __global__ void split_rows_bf16(const float* x, u16* t0, u16* t1, u16* t2, size_t rows, int k, int kp) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * kp) return;
    size_t r = idx / kp;
    int c = (int)(idx % kp);
    float v = c < k ? x[r * k + c] : 0.0f;
    u16 h = f32_to_bf16(v);
    t0[idx] = h;
    float rest = v - bf16_to_f32(h);
    u16 m = f32_to_bf16(rest);
    t1[idx] = m;
    if (t2) t2[idx] = f32_to_bf16(rest - bf16_to_f32(m));
}

// out[i, :] = table[ids[i], :]. Ids are validated on the host before upload (trait contract);
// an id out of range still reads nothing: its row is written as NaN so the bug is visible.
extern "C" __global__ void embedding(W w, const u32* ids, float* y, int n) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * w.cols) return;
    int i = (int)(idx / w.cols), c = (int)(idx % w.cols);
    u32 id = ids[i];
    y[idx] = id < (u32)w.rows ? w_at(w, (int)id, c) : __int_as_float(0x7fc00000);
}

// The k best of each row (descending, ties to the lower index, NaN ranked below -inf) in two
// launches, for k up to TOPK_MAX: top_k_part_f32 takes blockIdx.y's row in chunks of
// TOPK_THREADS * TOPK_REG (grid x), each block's k best to (pk, pi) [rows, parts, k] (a chunk
// with fewer leaves (-inf, INT_MAX) entries); top_k_final_f32 (one block per row) keeps the k
// best of the row's parts * k and writes their indices and, with vals non-null, values.
// argmax is k = 1. One block scanning a whole 151936-wide logits row (the kernel below) waited
// out an L2 round trip per ~4 elements per thread, and once more per k.
#define TOPK_THREADS 256
#define TOPK_REG 8
#define TOPK_NONE 0x7fffffff

// The block's best (key, index) ranked strictly after (pk_, pi_) among each thread's (bk, bi),
// returned to every thread.
__device__ __forceinline__ void topk_block_best(float& bk, int& bi) {
    __shared__ float kv[32];
    __shared__ int ki[32];
    for (int o = 16; o > 0; o >>= 1) {
        float ok = __shfl_xor_sync(0xffffffffu, bk, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ranks_before(ok, oi, bk, bi)) { bk = ok; bi = oi; }
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) { kv[wid] = bk; ki[wid] = bi; }
    __syncthreads();
    bk = kv[0];
    bi = ki[0];
    for (int w2 = 1; w2 < (int)(blockDim.x >> 5); w2++)
        if (ranks_before(kv[w2], ki[w2], bk, bi)) { bk = kv[w2]; bi = ki[w2]; }
    __syncthreads(); // kv / ki are written again by the next call
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    top_k_part_f32(const float* __restrict__ x, int v, int k, float* __restrict__ pk, int* __restrict__ pi) {
    pdl_enter();
    const float* xr = x + (size_t)blockIdx.y * v;
    const int i0 = blockIdx.x * (TOPK_THREADS * TOPK_REG);
    float key[TOPK_REG];
#pragma unroll
    for (int c = 0; c < TOPK_REG; c++) {
        const int i = i0 + threadIdx.x + TOPK_THREADS * c;
        key[c] = i < v ? rank_key(xr[i]) : -__int_as_float(0x7f800000);
    }
    const size_t out = ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * k;
    float prev_k = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int j = 0; j < k; j++) {
        float bk = -__int_as_float(0x7f800000);
        int bi = TOPK_NONE;
#pragma unroll
        for (int c = 0; c < TOPK_REG; c++) {
            const int i = i0 + threadIdx.x + TOPK_THREADS * c;
            if (i < v && ranks_before(prev_k, prev_i, key[c], i) && ranks_before(key[c], i, bk, bi)) { bk = key[c]; bi = i; }
        }
        topk_block_best(bk, bi);
        if (threadIdx.x == 0) { pk[out + j] = bk; pi[out + j] = bi; }
        prev_k = bk;
        prev_i = bi;
    }
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    top_k_final_f32(const float* __restrict__ x, int v, const float* __restrict__ pk, const int* __restrict__ pi, int m,
                    int k, float* __restrict__ vals, u32* __restrict__ ids) {
    pdl_enter();
    const size_t r = blockIdx.x;
    float prev_k = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int j = 0; j < k; j++) {
        float bk = -__int_as_float(0x7f800000);
        int bi = TOPK_NONE;
        for (int c = threadIdx.x; c < m; c += TOPK_THREADS) {
            const float ck = pk[r * m + c];
            const int ci = pi[r * m + c];
            if (ci != TOPK_NONE && ranks_before(prev_k, prev_i, ck, ci) && ranks_before(ck, ci, bk, bi)) { bk = ck; bi = ci; }
        }
        topk_block_best(bk, bi);
        if (threadIdx.x == 0) {
            // None is left only for a row of fewer than k values, which the host rejects.
            const int i = bi == TOPK_NONE ? 0 : bi;
            ids[r * k + j] = (u32)i;
            if (vals) vals[r * k + j] = x[r * v + i];
        }
        prev_k = bk;
        prev_i = bi;
    }
}

// Both stages for larger k (TOPK_SORT_FROM in src/backend.rs) sort their candidates at once
// instead of taking k block-wide passes over them (each pass a block reduction). A candidate is one
// u64 whose descending order is the ranking: the rank key's bits made monotone (-0 as +0, as
// the float compare has it) above the complemented index (ties to the lower index); 0 is an
// empty slot, below every candidate. `n`: the power of two of shared-memory slots.
__device__ __forceinline__ unsigned long long topk_sort_key(float key, int i) {
    const u32 b = __float_as_uint(key == 0.0f ? 0.0f : key);
    const u32 ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)ord << 32) | (0xFFFFFFFFu - (u32)i);
}

// Bitonic sort of n (a power of two) keys in shared memory, descending: runs of `size`
// alternate direction until the last merge. Every thread of the block takes part.
__device__ __forceinline__ void topk_sort_desc(unsigned long long* keys, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
                const int i = 2 * t - (t & (stride - 1)), j = i + stride;
                const unsigned long long a = keys[i], b = keys[j];
                if ((a < b) == ((i & size) == 0)) {
                    keys[i] = b;
                    keys[j] = a;
                }
            }
        }
    }
    __syncthreads();
}

// top_k_part_f32 for larger k: the chunk's TOPK_CHUNK_SORT logits sorted at once (k block-wide
// passes took most of the two launches' time at k = 64).
#define TOPK_CHUNK_SORT (TOPK_THREADS * TOPK_REG)
extern "C" __global__ void __launch_bounds__(1024)
    top_k_part_sort_f32(const float* __restrict__ x, int v, int k, float* __restrict__ pk, int* __restrict__ pi) {
    pdl_enter();
    __shared__ unsigned long long keys[TOPK_CHUNK_SORT];
    const float* xr = x + (size_t)blockIdx.y * v;
    const int i0 = blockIdx.x * TOPK_CHUNK_SORT;
    for (int c = threadIdx.x; c < TOPK_CHUNK_SORT; c += blockDim.x) {
        const int i = i0 + c;
        keys[c] = i < v ? topk_sort_key(rank_key(xr[i]), i) : 0ull;
    }
    topk_sort_desc(keys, TOPK_CHUNK_SORT);
    const size_t out = ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * k;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const unsigned long long key = keys[j];
        const int i = (int)(0xFFFFFFFFu - (u32)key);
        pk[out + j] = key == 0ull ? -__int_as_float(0x7f800000) : rank_key(xr[i]);
        pi[out + j] = key == 0ull ? TOPK_NONE : i;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    top_k_final_sort_f32(const float* __restrict__ x, int v, const float* __restrict__ pk, const int* __restrict__ pi,
                         int m, int k, int n, float* __restrict__ vals, u32* __restrict__ ids) {
    pdl_enter();
    extern __shared__ unsigned long long keys[];
    const size_t r = blockIdx.x;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const int ci = c < m ? pi[r * m + c] : TOPK_NONE;
        keys[c] = ci == TOPK_NONE ? 0ull : topk_sort_key(pk[r * m + c], ci);
    }
    topk_sort_desc(keys, n);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        // An empty slot is left only for a row of fewer than k values, which the host rejects.
        const unsigned long long key = keys[j];
        const int i = key == 0ull ? 0 : (int)(0xFFFFFFFFu - (u32)key);
        ids[r * k + j] = (u32)i;
        if (vals) vals[r * k + j] = x[r * v + i];
    }
}

// One block per row (k past TOPK_MAX): the k best in the total order above, one pass per rank.
// Pass j finds the best element ranked strictly after pass j-1's pick, so no membership set is
// needed.
extern "C" __global__ void top_k_f32(const float* x, float* vals, u32* ids, int v, int k) {
    pdl_enter();
    const float* xr = x + (size_t)blockIdx.x * v;
    float prev_k = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int j = 0; j < k; j++) {
        float bk = -__int_as_float(0x7f800000);
        int bi = TOPK_NONE;
        for (int i = threadIdx.x; i < v; i += blockDim.x) {
            float key = rank_key(xr[i]);
            if (ranks_before(prev_k, prev_i, key, i) && ranks_before(key, i, bk, bi)) { bk = key; bi = i; }
        }
        topk_block_best(bk, bi);
        if (threadIdx.x == 0) {
            vals[(size_t)blockIdx.x * k + j] = xr[bi];
            ids[(size_t)blockIdx.x * k + j] = (u32)bi;
        }
        prev_k = bk;
        prev_i = bi;
    }
}

// ---- Sampling weights: fp4moe_ops::sampling, the one definition ------------------------------
// The host draws from these sums, so they must be its bits: every operation below is rounded as
// the Rust code writes it (__fmul_rn / __fadd_rn are never contracted into fused multiply-adds),
// with the constants from the generated sampling.cuh.
#include "sampling.cuh"

// e^x for x <= 0; 0 below the cutoff and for NaN (fp4moe_ops::sampling::weight).
__device__ __forceinline__ float sampling_weight(float x) {
    const float xc = x > SW_CUTOFF ? x : SW_CUTOFF;
    const float t = __fadd_rn(__fmul_rn(xc, SW_LOG2E), SW_ROUND);
    const float n = __fsub_rn(t, SW_ROUND);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, SW_LN2_HI)), __fmul_rn(n, SW_LN2_LO));
    const float c[SW_TAYLOR_N] = SW_TAYLOR;
    float p = c[0];
#pragma unroll
    for (int i = 1; i < SW_TAYLOR_N; i++) p = __fadd_rn(__fmul_rn(p, r), c[i]);
    const float scale = __uint_as_float((__float_as_uint(t) - SW_ROUND_BITS + 127u) << 23);
    return x >= SW_CUTOFF ? __fmul_rn(p, scale) : 0.0f;
}

// One thread per SW_CHUNK ids of row blockIdx.y: the f32 sum, in id order, of the weights of
// x = (l - max) * inv_t (0 for the maximum itself) at or above `floor_`. Column 0 of `top`
// (row stride top_stride) is the row's largest logit.
extern "C" __global__ void weight_sums_f32(const float* __restrict__ x, const float* __restrict__ top, int v,
                                           int top_stride, float inv_t, float floor_, float* __restrict__ sums) {
    pdl_enter();
    const int chunks = (v + SW_CHUNK - 1) / SW_CHUNK;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const float mx = top[(size_t)blockIdx.y * top_stride];
    const float* xr = x + (size_t)blockIdx.y * v + (size_t)c * SW_CHUNK;
    const int len = min(SW_CHUNK, v - c * SW_CHUNK);
    float l[SW_CHUNK];
#pragma unroll
    for (int i = 0; i < SW_CHUNK; i++) l[i] = i < len ? xr[i] : 0.0f;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < SW_CHUNK; i++) {
        const float xs = l[i] == mx ? 0.0f : __fmul_rn(__fsub_rn(l[i], mx), inv_t);
        if (i < len && xs >= floor_) s = __fadd_rn(s, sampling_weight(xs));
    }
    sums[(size_t)blockIdx.y * chunks + c] = s;
}
