// Causal attention for decode and prefill, online softmax, deterministic (fixed merge orders).
// GQA stages key/value tiles in shared memory for all query heads of a kv head; MLA walks the
// latent cache with one block per (query, head), its warps merged at the end in a fixed order.
// Split ("flash-decoding"): with few queries, blocks over the whole cache cannot keep the GPU
// busy, so the keys are cut into ranges, each block writes its range's (max, sum, unnormalised
// values), and attention_combine merges the ranges in order. Values are held in registers,
// ATT_MAX_DV_PER_LANE per lane.
// Programmatic launch: these kernels wait for their inputs but do not trigger the next kernel
// early (common.cuh); with the early trigger, GLM decode on the H100 ran 12 % slower (176.6 vs
// 201.8 tok/s at 24 layers), the MLA decode blocks sharing their SMs with waiting successors.
#include "common.cuh"

#define ATT_WARPS 4 // MLA: warps per (query, head) block
#define ATT_MAX_DV_PER_LANE 16  // value width up to 512 (MLA's latent)
#define ATT_MAX_ROPE_PER_LANE 4 // MLA rope width up to 128
#define ATT_NEG_INF (-__int_as_float(0x7f800000))

// Merge the per-warp (max, sum, acc) states. ml == 0: write the normalised row to out. Otherwise
// write the block's unnormalised values to out and (max, sum) to ml[0..2] (a split's partial).
__device__ __forceinline__ void att_merge(float m, float l, const float* acc, int dv, float* out, float* ml) {
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
    float gm = ATT_NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) gm = fmaxf(gm, sm[w]);
    float gl = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) gl += sm[w] == ATT_NEG_INF ? 0.0f : sl[w] * expf(sm[w] - gm);
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm[w] != ATT_NEG_INF) v += sacc[w][d] * expf(sm[w] - gm);
        out[d] = ml ? v : v / gl;
    }
    if (ml && threadIdx.x == 0) { ml[0] = gm; ml[1] = gl; }
}

// Online-softmax step of one warp for score s and the value row this lane holds (elements
// lane, lane + 32, ... in registers, as lane_load puts them).
// EXACT: dv is exactly 32 * ATT_MAX_DV_PER_LANE (no per-element bound checks).
template <bool EXACT>
__device__ __forceinline__ void att_step(float s, const float* v, int dv, float& m, float& l, float* acc) {
    int lane = threadIdx.x & 31;
    float nm = fmaxf(m, s);
    float corr = m == ATT_NEG_INF ? 0.0f : expf(m - nm);
    float p = expf(s - nm);
    l = l * corr + p;
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) {
        int d = c * 32 + lane;
        if (EXACT || d < dv) acc[c] = acc[c] * corr + p * v[c];
    }
    m = nm;
}

// This lane's share of a row of n <= 32 * N floats (elements lane, lane + 32, ...; 0 past n).
// EXACT: the row is exactly 32 * N floats and n is not read.
template <int N, bool EXACT = false>
__device__ __forceinline__ void lane_load(const float* p, int n, float* r) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < N; c++) r[c] = EXACT || c * 32 + lane < n ? p[c * 32 + lane] : 0.0f;
}

// Lane partial of q . p, both this lane's share in registers (lane_load), zero past the row.
template <int N>
__device__ __forceinline__ float lane_dot(const float* q, const float* p) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < N; c++) s += q[c] * p[c];
    return s;
}

// This block's keys [j0, j1) of query t. Positions are read on the device (pos0 plus the graph's
// row shift, see Backend::replay) and so are the split ranges: the grid has as many splits as
// the cache could need, splits past the keys stay empty, and a recorded graph replays at any
// position. Split count and size follow the keys of the last query: ceil(keys / split_keys)
// ranges (at most gridDim.z) of equal size.
__device__ __forceinline__ void att_keys(int pos0, const unsigned* row_shift, int cache_rows, int split_keys,
                                         int t, int sp, int& j0, int& j1) {
    int p0 = pos0 + (int)*row_shift;
    int total = min(p0 + (int)gridDim.y, cache_rows);
    int splits = min((int)gridDim.z, max(1, (total + split_keys - 1) / split_keys));
    int chunk = (total + splits - 1) / splits;
    j0 = sp * chunk;
    j1 = min(min(p0 + t + 1, cache_rows), j0 + chunk);
}

// GQA: one block per (kv head, query, split) serves every query head of the kv head's group,
// one warp per query head (as many at a time as the block has warps). The block stages `tk` keys
// and values at a time in shared memory with coalesced loads; each warp scores the tile with one
// lane per key (padded rows, so the lanes hit distinct banks), takes the tile's max and sum at
// once, and accumulates the value rows with lanes along the value dims. A block per (query head,
// split) walking one key per warp step chained two memory latencies per key and read each key
// row once per query head (39 us per Qwen3 decode call at 2k keys); one lane per key straight
// from global memory turned every load into 32 scattered requests (83 us).
#define GQA_MAX_THREADS 256
#define GQA_STAGE_BATCH 4 // loads (of VW floats) of keys and of values each thread has in flight while staging

// Row stride (floats) of the vector kernel's key tile: an odd number of float4s, so the eight
// lanes of a 16-byte shared load phase, each on its own key row, hit distinct banks. Mirrored by
// gqa_key_stride in src/backend.rs.
__device__ __forceinline__ int gqa_key_stride(int d) { return 4 * ((d / 4) | 1); }

template <int VW> struct Floats { typedef float T; };
template <> struct Floats<4> { typedef float4 T; };

// The block's walk over rows jb .. jb + nk of head kh of a cache [S, hkv, width], in units of VW
// floats (4: 16-byte loads and stores; width and the rows then in whole float4s): element i of
// the flattened tile for thread i mod blockDim. Positions advance by the block size with a carry
// instead of a division per element (the first form, with 64-bit index products per float, was
// half of the kernel's instructions).
template <int VW>
struct TileWalk {
    const float* base;
    int rs, wv, n, dr, de, r, e;
    __device__ __forceinline__ TileWalk(const float* src, int hkv, int kh, int width, int jb, int nk) {
        base = src + ((size_t)jb * hkv + kh) * width;
        rs = hkv * width;
        wv = width / VW;
        n = nk * wv;
        dr = blockDim.x / wv;
        de = blockDim.x % wv;
        r = threadIdx.x / wv;
        e = threadIdx.x % wv;
    }
    // the current element (when live), and its offset in a tile of row stride ds; then advance
    __device__ __forceinline__ typename Floats<VW>::T next(bool live, int ds, int& at) {
        typedef typename Floats<VW>::T V;
        V val;
        if (live) val = *(const V*)(base + (size_t)r * rs + e * VW);
        at = r * ds + e * VW;
        r += dr;
        e += de;
        if (e >= wv) {
            e -= wv;
            r++;
        }
        return val;
    }
};

// Copies the key and value rows jb .. jb + nk of head kh into the shared tiles kt (row stride
// ks) and vt (row stride dv). Every thread issues its loads of both before it stores any: a copy
// loop over rows and columns with runtime bounds waited one memory latency per element (about
// 20 us per Qwen3 decode call), and keys then values waited two.
template <int VW>
__device__ __forceinline__ void stage_kv(float* kt, int ks, float* vt, const float* k, const float* v, int hkv, int kh,
                                         int d, int dv, int jb, int nk) {
    typedef typename Floats<VW>::T V;
    constexpr int B = GQA_STAGE_BATCH;
    TileWalk<VW> wk(k, hkv, kh, d, jb, nk), wvv(v, hkv, kh, dv, jb, nk);
    const int step = blockDim.x, n = max(wk.n, wvv.n);
    for (int i0 = threadIdx.x; i0 < n; i0 += B * step) {
        V a[B], b[B];
        int ai[B], bi[B];
#pragma unroll
        for (int u = 0; u < B; u++) a[u] = wk.next(i0 + u * step < wk.n, ks, ai[u]);
#pragma unroll
        for (int u = 0; u < B; u++) b[u] = wvv.next(i0 + u * step < wvv.n, dv, bi[u]);
#pragma unroll
        for (int u = 0; u < B; u++)
            if (i0 + u * step < wk.n) *(V*)(kt + ai[u]) = a[u];
#pragma unroll
        for (int u = 0; u < B; u++)
            if (i0 + u * step < wvv.n) *(V*)(vt + bi[u]) = b[u];
    }
}

// q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]. grid (Hkv, T, splits), block of
// `warps` * 32 <= GQA_MAX_THREADS, dynamic shared memory (tk * ks + tk * Dv + warps * D) floats
// with ks = gqa_key_stride(D), tk <= 32.
// With splits > 1, out is the partial buffer [T, Hq, splits, Dv] (unnormalised) and ml
// [T, Hq, splits, 2] (max, sum).
// VEC (D and Dv multiples of 4, Dv <= 128): scores from 16-byte shared loads in four partial
// sums, each lane owning four adjacent value dims. The scalar form (any widths, Dv <= 512) runs
// one 128-long FMA chain per score and a value loop sized for 512-wide rows, ~3k instructions
// per warp and tile at two warps per scheduler: 21 us per Qwen3 decode call whatever the split.
template <bool VEC>
__device__ __forceinline__ void gqa_decode(const float* q, const float* k, const float* v, float* out, float* ml,
                                           int hq, int hkv, int d, int dv, int tk, int pos0,
                                           const unsigned* row_shift, int cache_rows, int split_keys, float scale,
                                           int settled) {
    extern __shared__ float smem[];
    const int ks = VEC ? gqa_key_stride(d) : d + 1;
    const int warps = blockDim.x >> 5;
    float* kt = smem;          // [tk][ks]
    float* vt = kt + tk * ks;  // [tk][dv]
    float* qs = vt + tk * dv;  // [warps][d]
    int kh = blockIdx.x, t = blockIdx.y, sp = blockIdx.z, splits = gridDim.z;
    int group = hq / hkv;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int j0, j1;
    att_keys(pos0, row_shift, cache_rows, split_keys, t, sp, j0, j1);
    // The first tile, when every row of it lies below the step's first position and the host
    // says those rows are settled (`settled`: the kernel just before did not write them; in a
    // decode step they were written by earlier steps), is staged before the wait, so its DRAM
    // reads overlap the kernel before. The key range and the row shift may be read before the
    // wait: the shift is set before a replay starts.
    const bool early = settled && j0 < j1 && j0 + min(tk, j1 - j0) <= pos0 + (int)*row_shift;
    if (early) stage_kv<VEC ? 4 : 1>(kt, ks, vt, k, v, hkv, kh, d, dv, j0, min(tk, j1 - j0));
    pdl_wait(); // no early trigger: see the file comment
    constexpr int NACC = VEC ? 4 : ATT_MAX_DV_PER_LANE;
    for (int h0 = 0; h0 < group; h0 += warps) {
        int nh = min(warps, group - h0);
        if (h0 > 0) __syncthreads(); // the previous pass is done with qs and the tiles
        for (int hh = wid; hh < nh; hh += warps) {
            const float* qr = q + ((size_t)t * hq + kh * group + h0 + hh) * d;
            if (VEC) {
                // one 16-byte load per lane for heads up to 128 wide (a runtime-bounded scalar
                // loop waited one latency per element)
                for (int e = 4 * lane; e < d; e += 128) *(float4*)(qs + hh * d + e) = *(const float4*)(qr + e);
            } else {
                for (int e = lane; e < d; e += 32) qs[hh * d + e] = qr[e];
            }
        }
        bool active = wid < nh;
        float m = ATT_NEG_INF, l = 0.0f, acc[NACC];
#pragma unroll
        for (int c = 0; c < NACC; c++) acc[c] = 0.0f;
        for (int jb = j0; jb < j1; jb += tk) {
            int nk = min(tk, j1 - jb);
            if (!(early && h0 == 0 && jb == j0)) {
                __syncthreads(); // every warp is done with the previous tile
                stage_kv<VEC ? 4 : 1>(kt, ks, vt, k, v, hkv, kh, d, dv, jb, nk);
            }
            __syncthreads();
            if (!active) continue;
            const float* qh = qs + wid * d;
            float s = ATT_NEG_INF;
            if (lane < nk) {
                const float* kr = kt + lane * ks;
                if constexpr (VEC) {
                    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
                    for (int e = 0; e < d; e += 4) {
                        const float4 qq = *(const float4*)(qh + e), kk = *(const float4*)(kr + e);
                        a.x = fmaf(qq.x, kk.x, a.x);
                        a.y = fmaf(qq.y, kk.y, a.y);
                        a.z = fmaf(qq.z, kk.z, a.z);
                        a.w = fmaf(qq.w, kk.w, a.w);
                    }
                    s = ((a.x + a.y) + (a.z + a.w)) * scale;
                } else {
                    float dot = 0.0f;
#pragma unroll 8
                    for (int e = 0; e < d; e++) dot = fmaf(qh[e], kr[e], dot);
                    s = dot * scale;
                }
            }
            float nm = fmaxf(m, warp_max(s));
            float corr = m == ATT_NEG_INF ? 0.0f : expf(m - nm);
            float p = lane < nk ? expf(s - nm) : 0.0f;
            l = l * corr + warp_sum(p);
#pragma unroll
            for (int c = 0; c < NACC; c++) acc[c] *= corr;
            if constexpr (VEC) {
                const bool own = 4 * lane < dv;
                for (int r = 0; r < nk; r++) {
                    float pr = __shfl_sync(0xffffffffu, p, r);
                    if (own) {
                        const float4 vv = *(const float4*)(vt + r * dv + 4 * lane);
                        acc[0] = fmaf(pr, vv.x, acc[0]);
                        acc[1] = fmaf(pr, vv.y, acc[1]);
                        acc[2] = fmaf(pr, vv.z, acc[2]);
                        acc[3] = fmaf(pr, vv.w, acc[3]);
                    }
                }
            } else {
                for (int r = 0; r < nk; r++) {
                    float pr = __shfl_sync(0xffffffffu, p, r);
                    const float* vr = vt + r * dv;
#pragma unroll
                    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) {
                        int e = c * 32 + lane;
                        if (e < dv) acc[c] = fmaf(pr, vr[e], acc[c]);
                    }
                }
            }
            m = nm;
        }
        if (!active) continue;
        int h = kh * group + h0 + wid;
        size_t row = ((size_t)t * hq + h) * splits + sp;
        float inv = splits > 1 ? 1.0f : 1.0f / l;
#pragma unroll
        for (int c = 0; c < NACC; c++) {
            int e = VEC ? 4 * lane + c : c * 32 + lane;
            if (e < dv) out[row * dv + e] = acc[c] * inv;
        }
        if (splits > 1 && lane == 0) {
            ml[row * 2] = m;
            ml[row * 2 + 1] = l;
        }
    }
}

#define GQA_DECODE(NAME, VEC)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GQA_MAX_THREADS)                                               \
        NAME(const float* q, const float* k, const float* v, float* out, float* ml, int hq, int hkv, int d,     \
             int dv, int tk, int pos0, const unsigned* row_shift, int cache_rows, int split_keys, float scale,   \
             int settled) {                                                                                    \
        gqa_decode<VEC>(q, k, v, out, ml, hq, hkv, d, dv, tk, pos0, row_shift, cache_rows, split_keys, scale,  \
                        settled);                                                                              \
    }
GQA_DECODE(attention_gqa_f32, false)
GQA_DECODE(attention_gqa_vec_f32, true)

// GQA prefill (many queries): FlashAttention-style tiles on the CUDA cores. A block takes FA_BR
// consecutive queries of one query head and walks the causal keys in tiles of FA_BC; each of
// its 16 x 16 threads computes a 4 x 4 block of the score tile (queries and keys transposed in
// shared memory, so one 16-byte load feeds four products), the rows' running max and sum are
// reduced over the 16 threads that share them, the probabilities go through shared memory, and
// each thread accumulates 4 queries x FA_DV_PER_THREAD value dims. One block per (kv head,
// query) redid the softmax bookkeeping for every query and reloaded each key tile per query:
// 8 ms per Qwen3 layer at 2048 tokens (64 % of the prefill).
#define FA_BR 64
#define FA_BC 64
#define FA_MAX_D 128
#define FA_DV_PER_THREAD 8 // FA_MAX_D / 16

// q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv], D and Dv <= FA_MAX_D. grid
// (ceil(T / FA_BR), Hq), block 256, dynamic shared memory (2 * D * FA_BR + FA_BC * Dv +
// FA_BR * (FA_BC + 1)) floats. Query t sits at pos0 + row shift + t (see att_keys).
extern "C" __global__ void __launch_bounds__(256)
attention_gqa_prefill_f32(const float* q, const float* k, const float* v, float* out, int hq, int hkv, int d,
                          int dv, int t_n, int pos0, const unsigned* row_shift, int cache_rows, float scale) {
    pdl_wait(); // no early trigger: see the file comment
    extern __shared__ float fa[];
    float* qt = fa;                 // [d][FA_BR]   queries, transposed
    float* kt = qt + d * FA_BR;     // [d][FA_BC]   keys, transposed
    float* vs = kt + d * FA_BC;     // [FA_BC][dv]
    float* ps = vs + FA_BC * dv;    // [FA_BR][FA_BC + 1] probabilities
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int t0 = blockIdx.x * FA_BR, h = blockIdx.y, kh = h / (hq / hkv);
    const int p0 = pos0 + (int)*row_shift;
    // Transposed copies: consecutive threads take consecutive rows (queries, keys) of one column
    // group, so the shared stores hit consecutive banks. Taking consecutive columns of a row
    // instead made every store of the key tile a 32-way bank conflict (rows 64 floats apart).
    const bool vec = (d & 3) == 0;
    if (vec) {
        for (int i = tid; i < FA_BR * d / 4; i += 256) {
            int r = i % FA_BR, e = 4 * (i / FA_BR), t = t0 + r;
            float4 x = t < t_n ? *reinterpret_cast<const float4*>(q + ((size_t)t * hq + h) * d + e)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            qt[e * FA_BR + r] = x.x * scale;
            qt[(e + 1) * FA_BR + r] = x.y * scale;
            qt[(e + 2) * FA_BR + r] = x.z * scale;
            qt[(e + 3) * FA_BR + r] = x.w * scale;
        }
    } else {
        for (int i = tid; i < FA_BR * d; i += 256) {
            int r = i % FA_BR, e = i / FA_BR, t = t0 + r;
            qt[e * FA_BR + r] = t < t_n ? q[((size_t)t * hq + h) * d + e] * scale : 0.0f;
        }
    }
    float o[4][FA_DV_PER_THREAD], m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = ATT_NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < FA_DV_PER_THREAD; j++) o[i][j] = 0.0f;
    }
    // Keys of the block's last query (the others see a prefix of them).
    const int keys = min(p0 + min(t0 + FA_BR, t_n), cache_rows);
    for (int c0 = 0; c0 < keys; c0 += FA_BC) {
        __syncthreads(); // the previous tile is consumed (and qt written, the first time)
        if (vec) {
            for (int i = tid; i < FA_BC * d / 4; i += 256) {
                int c = i % FA_BC, e = 4 * (i / FA_BC), j = c0 + c;
                float4 x = j < keys ? *reinterpret_cast<const float4*>(k + ((size_t)j * hkv + kh) * d + e)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                kt[e * FA_BC + c] = x.x;
                kt[(e + 1) * FA_BC + c] = x.y;
                kt[(e + 2) * FA_BC + c] = x.z;
                kt[(e + 3) * FA_BC + c] = x.w;
            }
        } else {
            for (int i = tid; i < FA_BC * d; i += 256) {
                int c = i % FA_BC, e = i / FA_BC, j = c0 + c;
                kt[e * FA_BC + c] = j < keys ? k[((size_t)j * hkv + kh) * d + e] : 0.0f;
            }
        }
        for (int i = tid; i < FA_BC * dv; i += 256) {
            int c = i / dv, e = i % dv;
            int j = c0 + c;
            vs[c * dv + e] = j < keys ? v[((size_t)j * hkv + kh) * dv + e] : 0.0f;
        }
        __syncthreads();
        float sc[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) sc[i][j] = 0.0f;
#pragma unroll 4
        for (int e = 0; e < d; e++) {
            float4 a = *reinterpret_cast<const float4*>(qt + e * FA_BR + ty * 4);
            float4 b = *reinterpret_cast<const float4*>(kt + e * FA_BC + tx * 4);
            float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) sc[i][j] = fmaf(av[i], bv[j], sc[i][j]);
        }
        // Causal mask, running max and sum per row; the 16 threads of a row are lanes
        // 16 * (ty & 1) .. + 15 of one warp.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int pos = p0 + t0 + ty * 4 + i;
            float rm = ATT_NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                if (c0 + tx * 4 + j > pos || c0 + tx * 4 + j >= keys) sc[i][j] = ATT_NEG_INF;
                rm = fmaxf(rm, sc[i][j]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) rm = fmaxf(rm, __shfl_xor_sync(0xffffffffu, rm, off));
            float nm = fmaxf(m[i], rm);
            float corr = m[i] == ATT_NEG_INF ? 0.0f : expf(m[i] - nm);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float p = sc[i][j] == ATT_NEG_INF ? 0.0f : expf(sc[i][j] - nm);
                ps[(ty * 4 + i) * (FA_BC + 1) + tx * 4 + j] = p;
                rs += p;
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, off);
            l[i] = l[i] * corr + rs;
            m[i] = nm;
#pragma unroll
            for (int j = 0; j < FA_DV_PER_THREAD; j++) o[i][j] *= corr;
        }
        __syncthreads();
        int nc = min(FA_BC, keys - c0);
        for (int c = 0; c < nc; c++) {
            float pv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) pv[i] = ps[(ty * 4 + i) * (FA_BC + 1) + c];
#pragma unroll
            for (int j = 0; j < FA_DV_PER_THREAD; j++) {
                int e = tx + 16 * j;
                float vv = e < dv ? vs[c * dv + e] : 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) o[i][j] = fmaf(pv[i], vv, o[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = t0 + ty * 4 + i;
        if (t >= t_n) continue;
        float inv = 1.0f / l[i];
#pragma unroll
        for (int j = 0; j < FA_DV_PER_THREAD; j++) {
            int e = tx + 16 * j;
            if (e < dv) out[((size_t)t * hq + h) * dv + e] = o[i][j] * inv;
        }
    }
}

// MLA prefill (many queries): the same tiling over (query, head) rows, which all read the one
// latent cache. A block takes MLA_BR consecutive rows (row = query * H + head) and walks the causal
// cache in tiles of MLA_BC rows held once in shared memory, serving both the scores (row . q,
// the rope part included) and the values (the row's first L entries); each thread scores 4
// rows against one cache row and accumulates 4 rows x L/32 latent dims. One block per (query,
// head) read every cache row once per head and query from L2: 13.8 ms per GLM layer at 2048
// tokens (67 % of the prefill).
#define MLA_BR 32
#define MLA_BC 32

// q_lat [T, H, L], q_rope [T, H, R], cache [S, L + R] -> out [T, H, L]; L <= ATT_MAX_DV_PER_LANE
// * 32. grid (ceil(T * H / MLA_BR)), block 256 (8 x 32), dynamic shared memory
// ((L + R) * MLA_BR + MLA_BC * (L + R + 1) + MLA_BR * (MLA_BC + 1)) floats.
extern "C" __global__ void __launch_bounds__(256)
attention_mla_prefill_f32(const float* q_lat, const float* q_rope, const float* cache, float* out, int heads,
                          int l_dim, int r_dim, int t_n, int pos0, const unsigned* row_shift, int cache_rows,
                          float scale) {
    pdl_wait(); // no early trigger: see the file comment
    extern __shared__ float sm[];
    const int w = l_dim + r_dim, ws = w + 1;
    float* qt = sm;                  // [w][MLA_BR] queries (latent then rope), scaled, transposed
    float* tile = qt + w * MLA_BR;   // [MLA_BC][w + 1] cache rows
    float* ps = tile + MLA_BC * ws;  // [MLA_BR][MLA_BC + 1] probabilities
    const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5;
    const int r0 = blockIdx.x * MLA_BR, rows = t_n * heads;
    const int p0 = pos0 + (int)*row_shift;
    // Consecutive threads take consecutive rows of one column (conflict-free transposed stores;
    // consecutive columns of a row put every store of a warp on one bank).
    for (int i = tid; i < MLA_BR * w; i += 256) {
        int r = i % MLA_BR, e = i / MLA_BR;
        int row = r0 + r;
        float val = 0.0f;
        if (row < rows) val = e < l_dim ? q_lat[(size_t)row * l_dim + e] : q_rope[(size_t)row * r_dim + e - l_dim];
        qt[e * MLA_BR + r] = val * scale;
    }
    float o[4][ATT_MAX_DV_PER_LANE], m[4], l[4];
    int pos[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = ATT_NEG_INF;
        l[i] = 0.0f;
        pos[i] = p0 + (r0 + ty * 4 + i) / heads;
#pragma unroll
        for (int j = 0; j < ATT_MAX_DV_PER_LANE; j++) o[i][j] = 0.0f;
    }
    const int last = min(r0 + MLA_BR, rows) - 1;
    const int keys = min(p0 + last / heads + 1, cache_rows);
    for (int c0 = 0; c0 < keys; c0 += MLA_BC) {
        int nc = min(MLA_BC, keys - c0);
        __syncthreads(); // the previous tile is consumed (and qt written, the first time)
        const float* src = cache + (size_t)c0 * w;
        for (int i = tid; i < MLA_BC * w; i += 256) {
            int c = i / w, e = i % w;
            tile[c * ws + e] = c < nc ? src[i] : 0.0f;
        }
        __syncthreads();
        float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const float* kr = tile + tx * ws;
#pragma unroll 8
        for (int e = 0; e < w; e++) {
            float4 a = *reinterpret_cast<const float4*>(qt + e * MLA_BR + ty * 4);
            float b = kr[e];
            sc[0] = fmaf(a.x, b, sc[0]);
            sc[1] = fmaf(a.y, b, sc[1]);
            sc[2] = fmaf(a.z, b, sc[2]);
            sc[3] = fmaf(a.w, b, sc[3]);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int key = c0 + tx;
            float s = key > pos[i] || key >= keys ? ATT_NEG_INF : sc[i];
            float nm = fmaxf(m[i], warp_max(s));
            float corr = m[i] == ATT_NEG_INF ? 0.0f : expf(m[i] - nm);
            float p = s == ATT_NEG_INF ? 0.0f : expf(s - nm);
            ps[(ty * 4 + i) * (MLA_BC + 1) + tx] = p;
            l[i] = l[i] * corr + warp_sum(p);
            m[i] = nm;
#pragma unroll
            for (int j = 0; j < ATT_MAX_DV_PER_LANE; j++) o[i][j] *= corr;
        }
        __syncwarp(); // each warp reads only its own rows of ps
        for (int c = 0; c < nc; c++) {
            float pv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) pv[i] = ps[(ty * 4 + i) * (MLA_BC + 1) + c];
            const float* vr = tile + c * ws;
#pragma unroll
            for (int j = 0; j < ATT_MAX_DV_PER_LANE; j++) {
                int e = tx + 32 * j;
                float vv = e < l_dim ? vr[e] : 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) o[i][j] = fmaf(pv[i], vv, o[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = r0 + ty * 4 + i;
        if (row >= rows) continue;
        float inv = 1.0f / l[i];
#pragma unroll
        for (int j = 0; j < ATT_MAX_DV_PER_LANE; j++) {
            int e = tx + 32 * j;
            if (e < l_dim) out[(size_t)row * l_dim + e] = o[i][j] * inv;
        }
    }
}

// ---- Prefill on the tensor cores ---------------------------------------------------------------
// FlashAttention-2 layout: each warp owns 16 query rows, their scores (16 x 32 keys) and
// output rows live in mma accumulators, and the products are 3xTF32 (common.cuh), which keeps
// f32 agreement. The score fragment is reused as the value product's A fragment without
// shuffles: its columns 2t and 2t + 1 are read as k = t and t + 4, so the value tile's B
// fragment takes keys 2t and 2t + 1 (any key order is a valid reduction order). The f32
// kernels above remain for widths that are not multiples of 8; on the H100 they ran at ~13
// TFLOP/s (2.2 ms per Qwen3 layer and 7.0 ms per GLM layer at 2048 tokens).
// Each block copies the next key tile raw with cp.async while its warps work on the current one
// (copying with loads and stores serialised a memory latency per element: 2.0 ms per Qwen3 layer,
// hardly faster than the f32 kernel), and each warp splits the elements it reads.

// Mask, running max and sum, and probabilities for a warp's two rows (g, g + 8) of one tile of
// NT * 8 keys. s: score fragments, replaced by probabilities; l: this lane's partial sums (its
// own columns; the four lanes of a row are summed at the end by tc_row_sum); corr: the factor
// the output rows take.
template <int NT>
__device__ __forceinline__ void tc_softmax(float (*s)[4], int c0, int keys, const int* pos, float* m, float* l,
                                           float* corr) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float rm = ATT_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int key = c0 + nt * 8 + 2 * t + j;
                if (key > pos[r] || key >= keys) s[nt][2 * r + j] = ATT_NEG_INF;
                rm = fmaxf(rm, s[nt][2 * r + j]);
            }
        rm = fmaxf(rm, __shfl_xor_sync(0xffffffffu, rm, 1));
        rm = fmaxf(rm, __shfl_xor_sync(0xffffffffu, rm, 2));
        float nm = fmaxf(m[r], rm);
        // The hardware exp2 (`__expf`: 2 instructions, ~2^-22 relative near the row maximum,
        // where the sum's weight is) for expf's ~8 per score.
        corr[r] = m[r] == ATT_NEG_INF ? 0.0f : __expf(m[r] - nm);
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float& x = s[nt][2 * r + j];
                x = x == ATT_NEG_INF ? 0.0f : __expf(x - nm);
                rs += x;
            }
        l[r] = l[r] * corr[r] + rs;
        m[r] = nm;
    }
}

// A fragment (split) of the value product from one 8-key block of probabilities: c0 (g, 2t),
// c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1) -> a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
// a3 (g + 8, t + 4).
__device__ __forceinline__ void tc_p_frag(const float* p, u32* ah, u32* al) {
    tf32_split(p[0], ah[0], al[0]);
    tf32_split(p[2], ah[1], al[1]);
    tf32_split(p[1], ah[2], al[2]);
    tf32_split(p[3], ah[3], al[3]);
}

// One tensor-core product step of the prefill kernels: 3xTF32 (X3, f32 agreement) or one TF32
// product of the truncated operands (the `_tf32` kernels, for bf16-activation prefills: 3x
// fewer MMAs and no B splits; inputs rounded to 10 mantissa bits).
template <bool X3>
__device__ __forceinline__ void tc_mma(float* c, const u32* ah, const u32* al, float b0, float b1) {
    if (X3) mma_tf32x3(c, ah, al, b0, b1);
    else mma_tf32(c, ah, __float_as_uint(b0), __float_as_uint(b1));
}

// Scores of a warp's 16 rows against one key tile of NT * 8 keys: s = Q K^T over n k-steps of
// the query fragments qa (scaled, unsplit; split here, in the loop, so they stay one register
// each). k: this lane's key (g) at its first dims (2t, 2t + 1), rows rs floats apart.
template <int NT, int MAXKS, bool X3>
__device__ __forceinline__ void tc_scores(float (*s)[4], const float (*qa)[4], const float* k, int rs, int n) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[nt][i] = 0.0f;
#pragma unroll
    for (int st = 0; st < MAXKS; st++) {
        if (st >= n) break;
        u32 ah[4], al[4];
#pragma unroll
        for (int i = 0; i < 4; i++) tf32_split_here(qa[st][i], ah[i], al[i]);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            float2 x = *reinterpret_cast<const float2*>(k + nt * 8 * rs + 8 * st);
            tc_mma<X3>(s[nt], ah, al, x.x, x.y);
        }
    }
}

// One key tile's softmax step and value product for a warp's 16 rows: scores s (NT * 8 keys,
// replaced by probabilities), the output rows o (MAXNV value tiles, the first n in use) rescaled
// and accumulated. v: this lane's value column (g) of key 0, rows rs floats apart, tiles 8
// columns apart.
template <int NT, int MAXNV, bool X3>
__device__ __forceinline__ void tc_softmax_pv(float (*s)[4], float (*o)[4], int c0, int keys, const int* pos,
                                              float* m, float* l, const float* v, int rs, int n) {
    float corr[2];
    tc_softmax<NT>(s, c0, keys, pos, m, l, corr);
#pragma unroll
    for (int nv = 0; nv < MAXNV; nv++) {
        o[nv][0] *= corr[0];
        o[nv][1] *= corr[0];
        o[nv][2] *= corr[1];
        o[nv][3] *= corr[1];
    }
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int kk = 0; kk < NT; kk++) {
        u32 ah[4], al[4];
        tc_p_frag(s[kk], ah, al);
        const float* v0 = v + (kk * 8 + 2 * t) * rs;
#pragma unroll
        for (int nv = 0; nv < MAXNV; nv++) {
            if (nv >= n) break;
            tc_mma<X3>(o[nv], ah, al, v0[nv * 8], v0[rs + nv * 8]);
        }
    }
}

__device__ __forceinline__ float tc_row_sum(float l) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    return l + __shfl_xor_sync(0xffffffffu, l, 2);
}

// The column groups' split score sums (MLA's wide keys are scored by COLS warps per row group,
// each over its share of the key columns): every warp writes its partial scores of its 16 rows
// to `sp` (row stride sps), then, after the block barrier, sums all COLS partials of its row
// group in column order, so every warp of a row group holds the same full scores. Every thread
// of the block calls it (the barrier); `work` must be uniform across a row group. Returns
// `work`: false leaves `s` undefined.
template <int NT, int MAXKS, int ROWS, int COLS, bool X3>
__device__ __forceinline__ bool tc_scores_split(float (*s)[4], const float (*qa)[4], const float* k, int rs, int n,
                                                bool work, float* sp, int sps, int cg, int rg, int g, int t) {
    if (work) {
        tc_scores<NT, MAXKS, X3>(s, qa, k, rs, n);
        float* mine = sp + ((size_t)cg * ROWS + rg * 16 + g) * sps + 2 * t;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            *reinterpret_cast<float2*>(mine + nt * 8) = make_float2(s[nt][0], s[nt][1]);
            *reinterpret_cast<float2*>(mine + 8 * sps + nt * 8) = make_float2(s[nt][2], s[nt][3]);
        }
    }
    __syncthreads();
    if (!work) return false;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[nt][i] = 0.0f;
#pragma unroll
    for (int c = 0; c < COLS; c++) {
        const float* part = sp + ((size_t)c * ROWS + rg * 16 + g) * sps + 2 * t;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            float2 a = *reinterpret_cast<const float2*>(part + nt * 8);
            float2 b = *reinterpret_cast<const float2*>(part + 8 * sps + nt * 8);
            s[nt][0] += a.x;
            s[nt][1] += a.y;
            s[nt][2] += b.x;
            s[nt][3] += b.y;
        }
    }
    return true;
}

// A warp's normalized outputs: row r's (r = 0, 1: the fragment's rows g and g + 8) value
// columns (nv0 + nv) * 8 + 2 t, +1 for its vpc column tiles below nvt, to dst[r] (null: a row
// past the end).
template <int MAXNV>
__device__ __forceinline__ void tc_store_rows(const float (*o)[4], const float* l, float* const* dst, int nv0, int vpc,
                                              int nvt, int t) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float inv = 1.0f / tc_row_sum(l[r]);
        if (!dst[r]) continue;
#pragma unroll
        for (int nv = 0; nv < MAXNV; nv++)
            if (nv < vpc && nv0 + nv < nvt)
                *reinterpret_cast<float2*>(dst[r] + (nv0 + nv) * 8 + 2 * t) =
                    make_float2(o[nv][2 * r] * inv, o[nv][2 * r + 1] * inv);
    }
}

#define TCQ_BC 32   // keys per tile
#define TCQ_NT (TCQ_BC / 8)
#define TCQ_ROWS 64 // queries per block: 4 warps of 16
#define TCQ_MAX_D 128

// GQA prefill. q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]; D and Dv multiples
// of 8, at most TCQ_MAX_D. grid (ceil(T / TCQ_ROWS), Hq), block 128, dynamic shared memory
// 2 * TCQ_BC * (ks + vs) floats, ks = D rounded up to 32, + 8, vs likewise for Dv. Key and value
// tiles stay raw (two buffers each: the next tile is copied while this one is used) and each
// warp splits what it reads, as the MLA kernel does (splitting once per block into fragment
// layouts cost a pass and a barrier per tile: 0.96 ms per Qwen3 layer at 2048 tokens). Score
// reads: dims 2t, 2t + 1 of key g (8 bytes; ks = 8 mod 32 keeps a half warp on distinct banks;
// the query fragments use the same order); value reads: keys 2t and 2t + 1 of column g.
// Query fragments stay in registers (unsplit, 64 floats).
// D_, DV_: the widths at compile time (0: from the arguments); with Qwen3's 128 / 128 every tile
// loop and index is resolved by the compiler (runtime widths cost a division per copied element).
template <int D_, int DV_, bool X3>
__device__ __forceinline__ void gqa_prefill_tc(const float* q, const float* k, const float* v, float* out, int hq,
                                               int hkv, int d_arg, int dv_arg, int t_n, int pos0,
                                               const unsigned* row_shift, int cache_rows, float scale) {
    pdl_wait(); // no early trigger: see the file comment
    const int d = D_ ? D_ : d_arg, dv = DV_ ? DV_ : dv_arg;
    extern __shared__ float4 tcq_smem[];
    const int ks = ((d + 31) & ~31) + 8, vs = ((dv + 31) & ~31) + 8;
    float* kr = reinterpret_cast<float*>(tcq_smem); // [2][TCQ_BC][ks]
    float* vr = kr + 2 * TCQ_BC * ks;                // [2][TCQ_BC][vs]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // The last query tiles see the most keys: launch them first.
    const int t0 = (gridDim.x - 1 - blockIdx.x) * TCQ_ROWS, h = blockIdx.y, kh = h / (hq / hkv);
    const int p0 = pos0 + (int)*row_shift;
    const int keys = min(p0 + min(t0 + TCQ_ROWS, t_n), cache_rows);
    const int d4 = d / 4, dv4 = dv / 4;
    // Rows past the keys are zero-filled (the source is not read).
    auto fetch = [&](int c0, int buf) {
        const float* kb = k + ((size_t)c0 * hkv + kh) * d;
        const float* vb = v + ((size_t)c0 * hkv + kh) * dv;
        float* kd = kr + buf * TCQ_BC * ks;
        float* vd = vr + buf * TCQ_BC * vs;
        for (int i = tid; i < TCQ_BC * d4; i += 128) {
            int c = i / d4, e = 4 * (i % d4);
            bool ok = c0 + c < keys;
            cp_async16(kd + c * ks + e, ok ? kb + c * hkv * d + e : k, ok);
        }
        for (int i = tid; i < TCQ_BC * dv4; i += 128) {
            int c = i / dv4, e = 4 * (i % dv4);
            bool ok = c0 + c < keys;
            cp_async16(vd + c * vs + e, ok ? vb + c * hkv * dv + e : v, ok);
        }
        cp_async_commit();
    };
    fetch(0, 0);
    const int w0 = t0 + warp * 16;
    const int row[2] = {w0 + g, w0 + g + 8};
    const int pos[2] = {p0 + row[0], p0 + row[1]};
    const int nks = d / 8, nvt = dv / 8;
    float qa[TCQ_MAX_D / 8][4];
#pragma unroll
    for (int st = 0; st < TCQ_MAX_D / 8; st++) {
        float2 x0 = make_float2(0.0f, 0.0f), x1 = x0;
        if (st < nks) {
            if (row[0] < t_n) x0 = *reinterpret_cast<const float2*>(q + ((size_t)row[0] * hq + h) * d + 8 * st + 2 * t);
            if (row[1] < t_n) x1 = *reinterpret_cast<const float2*>(q + ((size_t)row[1] * hq + h) * d + 8 * st + 2 * t);
        }
        qa[st][0] = x0.x * scale;
        qa[st][1] = x1.x * scale;
        qa[st][2] = x0.y * scale;
        qa[st][3] = x1.y * scale;
    }
    float o[TCQ_MAX_D / 8][4], m[2] = {ATT_NEG_INF, ATT_NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nv = 0; nv < TCQ_MAX_D / 8; nv++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[nv][i] = 0.0f;
    // Tiles past this warp's last query are skipped (the block's diagonal).
    const bool live = w0 < t_n;
    const int last_pos = p0 + min(w0 + 15, t_n - 1);
    for (int c0 = 0, buf = 0; c0 < keys; c0 += TCQ_BC, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads(); // this tile has landed; the other buffers are consumed
        if (c0 + TCQ_BC < keys) fetch(c0 + TCQ_BC, buf ^ 1);
        if (!live || c0 > last_pos) continue;
        const float* kb = kr + buf * TCQ_BC * ks;
        const float* vb = vr + buf * TCQ_BC * vs;
        float s[TCQ_NT][4];
        tc_scores<TCQ_NT, TCQ_MAX_D / 8, X3>(s, qa, kb + g * ks + 2 * t, ks, nks);
        tc_softmax_pv<TCQ_NT, TCQ_MAX_D / 8, X3>(s, o, c0, keys, pos, m, l, vb + g, vs, nvt);
    }
    cp_async_wait<0>();
    float* dst[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dst[r] = row[r] < t_n ? out + ((size_t)row[r] * hq + h) * dv : nullptr;
    tc_store_rows<TCQ_MAX_D / 8>(o, l, dst, 0, TCQ_MAX_D / 8, nvt, t);
}

#define GQA_PREFILL_TC(NAME, D, DV, X3)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                            \
        NAME(const float* q, const float* k, const float* v, float* out, int hq, int hkv, int d, int dv, int t_n,  \
             int pos0, const unsigned* row_shift, int cache_rows, float scale) {                                  \
        gqa_prefill_tc<D, DV, X3>(q, k, v, out, hq, hkv, d, dv, t_n, pos0, row_shift, cache_rows, scale);         \
    }
GQA_PREFILL_TC(attention_gqa_prefill_tc, 0, 0, true)
GQA_PREFILL_TC(attention_gqa_prefill_tc_d128, 128, 128, true)
GQA_PREFILL_TC(attention_gqa_prefill_tc_tf32, 0, 0, false)

#define TCM_BC 32     // cache rows per tile
#define TCM_NT (TCM_BC / 8)
#define TCM_ROWS 32   // (query, head) rows per block: 2 row groups of 16 rows
#define TCM_COLS 4    // column groups: each scores a quarter of the width and owns a quarter of the values
#define TCM_MAX_KS 18 // score k-steps per column group: L + R <= 576
#define TCM_MAX_NV 16 // value n-tiles per column group: L <= 512

// MLA prefill (absorbed). q_lat [T, H, L], q_rope [T, H, R], cache [S, L + R] -> out [T, H, L]; L
// and R multiples of 8, L <= 512, L + R <= 576. grid (ceil(T * H / TCM_ROWS)), block 256 (8 warps:
// row group = warp % 2, column group = warp / 2), dynamic shared memory (2 * TCM_BC * rs +
// TCM_COLS * TCM_ROWS * (TCM_BC + 8)) floats, rs = L + R rounded up to 32, + 8. A warp's output
// rows are 16 x L / 4 (64 accumulators), so the four column groups of a row group each score a
// quarter of the width and add their partial scores through shared memory in a fixed order
// (every warp of the row group then holds the same probabilities). Unlike GQA the cache tile
// stays raw (two buffers: the next tile is copied while this one is used) and each warp splits
// the elements it reads: split copies of 576-wide rows in both products' layouts left room for
// only 16 keys per tile, whose fixed costs (the split pass, three barriers, the softmax, the
// query splits) came to ~8 instructions per mma. Score reads: dims 2t, 2t + 1 of key g (8
// bytes; rs = 8 mod 32 keeps a half warp on distinct banks); value reads: keys 2t and 2t + 1
// of column g (two-way conflicts).
// L_, R_: the widths at compile time (0: from the arguments), as for GQA (GLM's 512 / 64).
template <int L_, int R_, bool X3>
__device__ __forceinline__ void mla_prefill_tc(const float* q_lat, const float* q_rope, const float* cache,
                                               float* out, int heads, int l_arg, int r_arg, int t_n, int pos0,
                                               const unsigned* row_shift, int cache_rows, float scale) {
    pdl_wait(); // no early trigger: see the file comment
    const int l_dim = L_ ? L_ : l_arg, r_dim = R_ ? R_ : r_arg;
    extern __shared__ float4 tcm_smem[];
    const int w = l_dim + r_dim, rs = ((w + 31) & ~31) + 8, sps = TCM_BC + 8;
    float* raw = reinterpret_cast<float*>(tcm_smem); // [2][TCM_BC][rs]
    float* sp = raw + 2 * TCM_BC * rs;                // [TCM_COLS][TCM_ROWS][sps] partial scores
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int rg = warp & 1, cg = warp >> 1;
    const int rows = t_n * heads;
    // The last rows see the most keys: launch them first.
    const int r0 = (gridDim.x - 1 - blockIdx.x) * TCM_ROWS, w0 = r0 + rg * 16;
    const int p0 = pos0 + (int)*row_shift;
    const int last = min(r0 + TCM_ROWS, rows) - 1;
    const int keys = min(p0 + last / heads + 1, cache_rows);
    const int w4 = w / 4;
    // Rows past the keys are zero-filled (the source is not read).
    auto fetch = [&](int c0, int buf) {
        float* dst = raw + buf * TCM_BC * rs;
        for (int i = tid; i < TCM_BC * w4; i += 256) {
            int c = i / w4, e = 4 * (i % w4);
            bool ok = c0 + c < keys;
            cp_async16(dst + c * rs + e, ok ? cache + (size_t)(c0 + c) * w + e : cache, ok);
        }
        cp_async_commit();
    };
    fetch(0, 0);
    const int row[2] = {w0 + g, w0 + g + 8};
    const int pos[2] = {p0 + row[0] / heads, p0 + row[1] / heads};
    const int nks = w / 8, kpc = (nks + TCM_COLS - 1) / TCM_COLS, ks0 = cg * kpc;
    const int nvt = l_dim / 8, vpc = (nvt + TCM_COLS - 1) / TCM_COLS, nv0 = cg * vpc;
    // Value tiles of this column group (a compile-time 16 for GLM's widths: with the runtime
    // bound the 512-wide kernel compiled to 232 registers and ran 12 % slower).
    const int nvl = L_ && nvt % TCM_COLS == 0 ? vpc : min(vpc, nvt - nv0);
    float qa[TCM_MAX_KS][4];
#pragma unroll
    for (int st = 0; st < TCM_MAX_KS; st++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float2 x = make_float2(0.0f, 0.0f);
            const int gs = ks0 + st;
            if (st < kpc && gs < nks && row[r] < rows) {
                // l_dim % 8 == 0: e and e + 1 lie on the same side of it.
                const int e = 8 * gs + 2 * t;
                x = *reinterpret_cast<const float2*>(e < l_dim ? q_lat + (size_t)row[r] * l_dim + e
                                                               : q_rope + (size_t)row[r] * r_dim + e - l_dim);
            }
            qa[st][r] = x.x * scale;
            qa[st][2 + r] = x.y * scale;
        }
    }
    float o[TCM_MAX_NV][4], m[2] = {ATT_NEG_INF, ATT_NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nv = 0; nv < TCM_MAX_NV; nv++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[nv][i] = 0.0f;
    const bool live = w0 < rows;
    const int last_pos = p0 + min(w0 + 15, rows - 1) / heads;
    for (int c0 = 0, buf = 0; c0 < keys; c0 += TCM_BC, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads(); // this tile has landed; the other buffer and the partials are consumed
        if (c0 + TCM_BC < keys) fetch(c0 + TCM_BC, buf ^ 1);
        const float* kb = raw + buf * TCM_BC * rs;
        // Uniform across a row group's four warps (same rows), as the exchange below needs.
        const bool work = live && c0 <= last_pos;
        float s[TCM_NT][4];
        if (!tc_scores_split<TCM_NT, TCM_MAX_KS, TCM_ROWS, TCM_COLS, X3>(
                s, qa, kb + g * rs + 8 * ks0 + 2 * t, rs, min(kpc, nks - ks0), work, sp, sps, cg, rg, g, t))
            continue;
        tc_softmax_pv<TCM_NT, TCM_MAX_NV, X3>(s, o, c0, keys, pos, m, l, kb + nv0 * 8 + g, rs, nvl);
    }
    cp_async_wait<0>();
    float* dst[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dst[r] = row[r] < rows ? out + (size_t)row[r] * l_dim : nullptr;
    tc_store_rows<TCM_MAX_NV>(o, l, dst, nv0, vpc, nvt, t);
}

#define MLA_PREFILL_TC(NAME, L, R, X3)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        NAME(const float* q_lat, const float* q_rope, const float* cache, float* out, int heads, int l_dim,       \
             int r_dim, int t_n, int pos0, const unsigned* row_shift, int cache_rows, float scale) {              \
        mla_prefill_tc<L, R, X3>(q_lat, q_rope, cache, out, heads, l_dim, r_dim, t_n, pos0, row_shift,            \
                                 cache_rows, scale);                                                             \
    }
MLA_PREFILL_TC(attention_mla_prefill_tc, 0, 0, true)
MLA_PREFILL_TC(attention_mla_prefill_tc_l512_r64, 512, 64, true)
MLA_PREFILL_TC(attention_mla_prefill_tc_tf32, 0, 0, false)
MLA_PREFILL_TC(attention_mla_prefill_tc_l512_r64_tf32, 512, 64, false)

#define TCE_BC 32   // keys per tile
#define TCE_NT (TCE_BC / 8)
#define TCE_ROWS 64 // queries per block: 4 row groups of 16
#define TCE_COLS 2  // column groups: each scores half the key width and owns half the values
#define TCE_MAX_KS 16 // score k-steps per column group: N + R <= 256
#define TCE_MAX_NV 16 // value n-tiles per column group: Dv <= 256

// MLA prefill in the expanded form (transformers' own): every head has its keys [k_nope | k_r]
// and values. q_nope [T, H, N], q_rope [T, H, R], kv [S, H, N + Dv] (per key row and head: k_nope,
// then the values), k_rope [S, R] (shared by the heads) -> out [T, H, Dv]. N, R and Dv multiples
// of 8, N + R <= 256, Dv <= 256. grid (ceil(T / TCE_ROWS), H), block 256 (8 warps: row group =
// warp % 4, column group = warp / 4), dynamic shared memory (2 * TCE_BC * (ks + vs) + TCE_COLS *
// TCE_ROWS * (TCE_BC + 8)) floats, ks = N + R rounded up to 32, + 8, vs likewise for Dv.
// GQA's layout (raw key and value tiles, two buffers each, every warp splitting what it reads)
// with MLA's column groups: a warp holding all of a 256-wide query and output would need 256
// registers for them alone, so the two column groups of a row group each score half the width,
// add their partial scores through shared memory in a fixed order, and own half the values.
// The key tile is assembled by the copy: dims below N from kv, the rest from k_rope. Always
// 3xTF32 (f32 agreement): bf16 prefills at GLM's widths take the bf16 kernel below, and at
// other widths keep f32 products (CudaBackend::mla_expanded says why).
template <int N_, int R_, int DV_>
__device__ __forceinline__ void mla_expanded_prefill_tc(const float* q_nope, const float* q_rope, const float* kv,
                                                        const float* k_rope, float* out, int heads, int n_arg,
                                                        int r_arg, int dv_arg, int t_n, int pos0,
                                                        const unsigned* row_shift, int cache_rows, float scale) {
    pdl_wait(); // no early trigger: see the file comment
    const int nd = N_ ? N_ : n_arg, rd = R_ ? R_ : r_arg, dv = DV_ ? DV_ : dv_arg;
    const int d = nd + rd, kvw = nd + dv;
    extern __shared__ float4 tce_smem[];
    const int ks = ((d + 31) & ~31) + 8, vs = ((dv + 31) & ~31) + 8, sps = TCE_BC + 8;
    float* kr = reinterpret_cast<float*>(tce_smem); // [2][TCE_BC][ks]
    float* vr = kr + 2 * TCE_BC * ks;                // [2][TCE_BC][vs]
    float* sp = vr + 2 * TCE_BC * vs;                // [TCE_COLS][TCE_ROWS][sps] partial scores
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int rg = warp & 3, cg = warp >> 2;
    // The last query tiles see the most keys: launch them first.
    const int t0 = (gridDim.x - 1 - blockIdx.x) * TCE_ROWS, h = blockIdx.y;
    const int p0 = pos0 + (int)*row_shift;
    const int keys = min(p0 + min(t0 + TCE_ROWS, t_n), cache_rows);
    const int d4 = d / 4, dv4 = dv / 4, n4 = nd / 4;
    // Rows past the keys are zero-filled (the source is not read).
    auto fetch = [&](int c0, int buf) {
        float* kd = kr + buf * TCE_BC * ks;
        float* vd = vr + buf * TCE_BC * vs;
        for (int i = tid; i < TCE_BC * d4; i += 256) {
            const int c = i / d4, e4 = i % d4;
            const bool ok = c0 + c < keys;
            const float* src = e4 < n4 ? kv + ((size_t)(c0 + c) * heads + h) * kvw + 4 * e4
                                       : k_rope + (size_t)(c0 + c) * rd + 4 * (e4 - n4);
            cp_async16(kd + c * ks + 4 * e4, ok ? src : kv, ok);
        }
        for (int i = tid; i < TCE_BC * dv4; i += 256) {
            const int c = i / dv4, e = 4 * (i % dv4);
            const bool ok = c0 + c < keys;
            cp_async16(vd + c * vs + e, ok ? kv + ((size_t)(c0 + c) * heads + h) * kvw + nd + e : kv, ok);
        }
        cp_async_commit();
    };
    fetch(0, 0);
    const int w0 = t0 + rg * 16;
    const int row[2] = {w0 + g, w0 + g + 8};
    const int pos[2] = {p0 + row[0], p0 + row[1]};
    const int nks = d / 8, kpc = (nks + TCE_COLS - 1) / TCE_COLS, ks0 = cg * kpc;
    const int nvt = dv / 8, vpc = (nvt + TCE_COLS - 1) / TCE_COLS, nv0 = cg * vpc;
    const int nvl = DV_ && nvt % TCE_COLS == 0 ? vpc : min(vpc, nvt - nv0);
    float qa[TCE_MAX_KS][4];
#pragma unroll
    for (int st = 0; st < TCE_MAX_KS; st++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float2 x = make_float2(0.0f, 0.0f);
            const int gs = ks0 + st;
            if (st < kpc && gs < nks && row[r] < t_n) {
                // nd % 8 == 0: e and e + 1 lie on the same side of it.
                const int e = 8 * gs + 2 * t;
                const size_t qr = (size_t)row[r] * heads + h;
                x = *reinterpret_cast<const float2*>(e < nd ? q_nope + qr * nd + e : q_rope + qr * rd + e - nd);
            }
            qa[st][r] = x.x * scale;
            qa[st][2 + r] = x.y * scale;
        }
    }
    float o[TCE_MAX_NV][4], m[2] = {ATT_NEG_INF, ATT_NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nv = 0; nv < TCE_MAX_NV; nv++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[nv][i] = 0.0f;
    const bool live = w0 < t_n;
    const int last_pos = p0 + min(w0 + 15, t_n - 1);
    for (int c0 = 0, buf = 0; c0 < keys; c0 += TCE_BC, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads(); // this tile has landed; the other buffers and the partials are consumed
        if (c0 + TCE_BC < keys) fetch(c0 + TCE_BC, buf ^ 1);
        const float* kb = kr + buf * TCE_BC * ks;
        const float* vb = vr + buf * TCE_BC * vs;
        // Uniform across a row group's two warps (same rows), as the exchange below needs.
        const bool work = live && c0 <= last_pos;
        float s[TCE_NT][4];
        if (!tc_scores_split<TCE_NT, TCE_MAX_KS, TCE_ROWS, TCE_COLS, true>(
                s, qa, kb + g * ks + 8 * ks0 + 2 * t, ks, min(kpc, nks - ks0), work, sp, sps, cg, rg, g, t))
            continue;
        tc_softmax_pv<TCE_NT, TCE_MAX_NV, true>(s, o, c0, keys, pos, m, l, vb + nv0 * 8 + g, vs, nvl);
    }
    cp_async_wait<0>();
    float* dst[2];
#pragma unroll
    for (int r = 0; r < 2; r++) dst[r] = row[r] < t_n ? out + ((size_t)row[r] * heads + h) * dv : nullptr;
    tc_store_rows<TCE_MAX_NV>(o, l, dst, nv0, vpc, nvt, t);
}

#define MLA_EXPANDED_PREFILL_TC(NAME, N, R, DV)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        NAME(const float* q_nope, const float* q_rope, const float* kv, const float* k_rope, float* out,          \
             int heads, int n, int r, int dv, int t_n, int pos0, const unsigned* row_shift, int cache_rows,       \
             float scale) {                                                                                      \
        mla_expanded_prefill_tc<N, R, DV>(q_nope, q_rope, kv, k_rope, out, heads, n, r, dv, t_n, pos0,            \
                                          row_shift, cache_rows, scale);                                         \
    }
MLA_EXPANDED_PREFILL_TC(attention_mla_expanded_prefill_tc, 0, 0, 0)
MLA_EXPANDED_PREFILL_TC(attention_mla_expanded_prefill_tc_n192_r64_v256, 192, 64, 256)

// ---- bf16 prefill (FlashAttention-2 form) ---------------------------------------------------
// For prefills on bf16 activations (Backend::attention_gqa_bf16, attention_mla_expanded with
// `bf16`): the scaled queries, keys, probabilities and values are rounded to bf16 and multiplied
// by m16n8k16 bf16 mma (twice TF32's rate, half its shared-memory bytes per product); scores,
// the softmax and the outputs stay f32. The TF32 kernels above reached ~61 TFLOP/s of 3xTF32
// work (Qwen3's d128) and ~33 (GLM's expanded MLA): each warp split every element it read, and
// f32 tiles held a quarter of a bf16 tile's keys.
// The host rounds the keys and values to bf16 once per call (a kv head's tile serves all its
// query heads' blocks); the queries are rounded here, with scale * log2(e) folded in, so the
// softmax runs in base 2 (ex2.approx: -inf -> 0).
// Shared memory (bf16): the query tile [FAB_ROWS][DQ + 8], two key tiles [BN][DQ + 8], two value
// tiles [BN][DV + 8]; rows 16 bytes longer than their data put ldmatrix's 8 rows on distinct
// banks. Each warp owns 16 query rows; its score fragments become the value product's A
// fragments in registers (the accumulator layout of two 8-key tiles is the A layout of one
// 16-key step).
#define FAB_ROWS 64 // queries per block: 4 warps of 16

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The two 8-column tiles of one ldmatrix_x4 B fragment (b[0..1] columns 0-7 into c0, b[2..3]
// columns 8-15 into c1) times one A fragment.
__device__ __forceinline__ void mma_bf16_x2(float* c0, float* c1, const u32* a, const u32* b) {
    mma_bf16(c0, a, b[0], b[1]);
    mma_bf16(c1, a, b[2], b[3]);
}

// q: the query's first DA dims from qa [T, Hq, DA], the next DB from qb [T, Hq, DB]; key j of kv
// head kh: DA elements at ka + j * ka_key + kh * ka_head, then DB at kb + j * kb_key +
// kb_head * kh; its value: DV elements at v + j * v_key + kh * v_head (all bf16, 16-byte
// aligned). Keys 0..keys_n exist; query t sits at position pos0 + t. out [T, Hq, DV].
template <int DA, int DB, int DV, int BN>
__device__ __forceinline__ void fa_bf16_prefill(const float* qa, const float* qb, const u16* ka, const u16* kb,
                                                const u16* v, float* out, int hq, int hkv, int ka_key, int ka_head,
                                                int kb_key, int kb_head, int v_key, int v_head, int t_n, int pos0,
                                                int keys_n, float scale) {
    constexpr int DQ = DA + DB, QS = DQ + 8, VS = DV + 8, NT = BN / 8, KC = DQ / 8, VC = DV / 8;
    // Query fragments in registers where they fit beside the outputs (GQA's 128 dims: 32
    // registers), else read from the query tile at every key tile.
    constexpr bool QREG = DQ <= 128;
    static_assert(DA % 8 == 0 && DB % 8 == 0 && DQ % 16 == 0 && DV % 16 == 0 && BN % 16 == 0, "whole mma steps");
    pdl_wait(); // no early trigger: see the file comment
    extern __shared__ float4 fab_smem[];
    u16* qs = reinterpret_cast<u16*>(fab_smem); // [FAB_ROWS][QS]
    u16* ks = qs + FAB_ROWS * QS;                // [2][BN][QS]
    u16* vs = ks + 2 * BN * QS;                  // [2][BN][VS]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // The last query tiles see the most keys: launch them first.
    const int t0 = (gridDim.x - 1 - blockIdx.x) * FAB_ROWS, h = blockIdx.y, kh = h / (hq / hkv);
    const int keys = min(pos0 + min(t0 + FAB_ROWS, t_n), keys_n);
    // Each thread copies the same 16-byte column of every (128 / KC)-th key row and value row,
    // from pointers set up once (per-copy index arithmetic was a quarter of the instructions).
    // Rows past the keys are zero-filled (the source is not read), so their values are finite.
    static_assert(128 % KC == 0 && 128 % VC == 0 && BN % (128 / KC) == 0 && BN % (128 / VC) == 0, "copy layout");
    constexpr int KR = 128 / KC, VR = 128 / VC; // rows copied per pass
    const int kc = tid / KC, ke = 8 * (tid % KC), vc = tid / VC, ve = 8 * (tid % VC);
    const u16* ksrc = ke < DA ? ka + (size_t)kc * ka_key + kh * ka_head + ke
                              : kb + (size_t)kc * kb_key + kh * kb_head + (ke - DA);
    const size_t kstep = ke < DA ? (size_t)ka_key : (size_t)kb_key;
    const u16* vsrc = v + (size_t)vc * v_key + kh * v_head + ve;
    auto fetch = [&](int c0, int buf) {
        u16* kd = ks + buf * BN * QS + kc * QS + ke;
        u16* vd = vs + buf * BN * VS + vc * VS + ve;
        const u16* kp = ksrc + (size_t)c0 * kstep;
        const u16* vp = vsrc + (size_t)c0 * v_key;
#pragma unroll
        for (int u = 0; u < BN / KR; u++) {
            bool ok = c0 + kc + u * KR < keys;
            cp_async16(kd + u * KR * QS, ok ? kp + u * KR * kstep : ka, ok);
        }
#pragma unroll
        for (int u = 0; u < BN / VR; u++) {
            bool ok = c0 + vc + u * VR < keys;
            cp_async16(vd + u * VR * VS, ok ? vp + (size_t)u * VR * v_key : v, ok);
        }
        cp_async_commit();
    };
    fetch(0, 0);
    const float qscale = scale * 1.4426950408889634f;
    for (int i = tid; i < FAB_ROWS * (DQ / 4); i += 128) {
        int r = i / (DQ / 4), e = 4 * (i % (DQ / 4)), row = t0 + r;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row < t_n)
            x = e < DA ? *reinterpret_cast<const float4*>(qa + ((size_t)row * hq + h) * DA + e)
                       : *reinterpret_cast<const float4*>(qb + ((size_t)row * hq + h) * DB + (e - DA));
        *reinterpret_cast<uint2*>(qs + r * QS + e) =
            make_uint2(bf16x2_from(x.x * qscale, x.y * qscale), bf16x2_from(x.z * qscale, x.w * qscale));
    }
    __syncthreads();
    // ldmatrix rows: A (queries) and B (keys) read [row][dim] tiles plainly, values transposed.
    const u16* q_lane = qs + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * QS + 8 * (lane >> 4);
    const int k_lane = ((lane & 7) + 8 * (lane >> 4)) * QS + 8 * ((lane >> 3) & 1);
    const int v_lane = ((lane & 7) + 8 * ((lane >> 3) & 1)) * VS + 8 * (lane >> 4);
    u32 qf[QREG ? DQ / 16 : 1][4];
    if (QREG) {
#pragma unroll
        for (int st = 0; st < (QREG ? DQ / 16 : 0); st++) ldmatrix_x4(qf[st], q_lane + st * 16);
    }
    const int w0 = t0 + warp * 16;
    const int pos[2] = {pos0 + w0 + g, pos0 + w0 + g + 8};
    // Tiles past this warp's last query are skipped (the block's diagonal).
    const bool live = w0 < t_n;
    const int first_pos = pos0 + w0, last_pos = pos0 + min(w0 + 15, t_n - 1);
    float o[DV / 8][4], m[2] = {ATT_NEG_INF, ATT_NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nv = 0; nv < DV / 8; nv++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[nv][i] = 0.0f;
    for (int c0 = 0, buf = 0; c0 < keys; c0 += BN, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads(); // this tile has landed; the other buffers are consumed
        if (c0 + BN < keys) fetch(c0 + BN, buf ^ 1);
        if (!live || c0 > last_pos) continue;
        const u16* kt = ks + buf * BN * QS + k_lane;
        const u16* vt = vs + buf * BN * VS + v_lane;
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) s[nt][i] = 0.0f;
#pragma unroll
        for (int st = 0; st < DQ / 16; st++) {
            u32 a[4];
            if (QREG) {
#pragma unroll
                for (int i = 0; i < 4; i++) a[i] = qf[QREG ? st : 0][i];
            } else {
                ldmatrix_x4(a, q_lane + st * 16);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                u32 b[4];
                ldmatrix_x4(b, kt + np * 16 * QS + st * 16);
                mma_bf16_x2(s[2 * np], s[2 * np + 1], a, b);
            }
        }
        // The mask, only where the tile reaches past this warp's first position or the keys.
        if (c0 + BN - 1 > first_pos || c0 + BN > keys) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    int key = c0 + nt * 8 + 2 * t + (i & 1);
                    if (key > pos[i >> 1] || key >= keys) s[nt][i] = ATT_NEG_INF;
                }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float rm = ATT_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) rm = fmaxf(rm, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            rm = fmaxf(rm, __shfl_xor_sync(0xffffffffu, rm, 1));
            rm = fmaxf(rm, __shfl_xor_sync(0xffffffffu, rm, 2));
            // Key 0 is every row's, so the first tile leaves each maximum finite.
            const float nm = fmaxf(m[r], rm), corr = fast_exp2(m[r] - nm);
            float rs = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float p = fast_exp2(s[nt][2 * r + j] - nm);
                    s[nt][2 * r + j] = p;
                    rs += p;
                }
            l[r] = l[r] * corr + rs;
            m[r] = nm;
#pragma unroll
            for (int nv = 0; nv < DV / 8; nv++) {
                o[nv][2 * r] *= corr;
                o[nv][2 * r + 1] *= corr;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 a[4] = {bf16x2_from(s[2 * kk][0], s[2 * kk][1]), bf16x2_from(s[2 * kk][2], s[2 * kk][3]),
                        bf16x2_from(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        bf16x2_from(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DV / 16; dp++) {
                u32 b[4];
                ldmatrix_x4_trans(b, vt + kk * 16 * VS + dp * 16);
                mma_bf16_x2(o[2 * dp], o[2 * dp + 1], a, b);
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = w0 + g + 8 * r;
        const float inv = 1.0f / tc_row_sum(l[r]);
        if (row >= t_n) continue;
        float* dst = out + ((size_t)row * hq + h) * DV + 2 * t;
#pragma unroll
        for (int nv = 0; nv < DV / 8; nv++)
            *reinterpret_cast<float2*>(dst + nv * 8) = make_float2(o[nv][2 * r] * inv, o[nv][2 * r + 1] * inv);
    }
}

// GQA (Qwen3's widths): q [T, Hq, 128]; k, v [keys, Hkv, 128] bf16.
extern "C" __global__ void __launch_bounds__(128, 2)
    attention_gqa_prefill_bf16_d128(const float* q, const u16* k, const u16* v, float* out, int hq, int hkv,
                                    int t_n, int pos0, int keys_n, float scale) {
    fa_bf16_prefill<128, 0, 128, 64>(q, q, k, k, v, out, hq, hkv, hkv * 128, 128, 0, 0, hkv * 128, 128, t_n, pos0,
                                     keys_n, scale);
}

// Expanded MLA (GLM's widths): q_nope [T, H, 192], q_rope [T, H, 64]; kv [keys, H, 192 + 256]
// bf16 (each head's key part, then its values); k_rope [keys, 64] bf16, shared by the heads.
extern "C" __global__ void __launch_bounds__(128, 2)
    attention_mla_expanded_prefill_bf16_n192_r64_v256(const float* q_nope, const float* q_rope, const u16* kv,
                                                      const u16* k_rope, float* out, int heads, int t_n, int pos0,
                                                      int keys_n, float scale) {
    fa_bf16_prefill<192, 64, 256, 32>(q_nope, q_rope, kv, k_rope, kv + 192, out, heads, heads, heads * 448, 448, 64,
                                      0, heads * 448, 448, t_n, pos0, keys_n, scale);
}

// Absorbed MLA: q_lat [T, H, L], q_rope [T, H, R], cache [S, L + R] -> out [T, H, L].
// grid (H, T, splits), block ATT_WARPS * 32, partials as in attention_gqa_f32. (Staging cache
// tiles in shared memory for a group of heads, as GQA does, measured slower here: 35 -> 87 us
// per GLM decode call, with 16 scores per warp held in registers and reduced one by one; see
// NOTES.md.) NR: rope floats per lane; EXACT: L = 32 * ATT_MAX_DV_PER_LANE and R = 32 * NR
// exactly (GLM's 512 + 64), so no load or update checks its bound: with the checks and a
// three-row register ring a key took 281 instructions, 47 of them bound compares and 55 moves.
// Each warp walks its keys two at a time, the next row in flight while it scores one: loading
// a row only when its turn came left every key waiting a full memory latency (27 us per GLM
// decode call at 64 keys per block, 16 rows in turn per warp).
template <int NR, bool EXACT>
__device__ __forceinline__ void mla_decode(const float* q_lat, const float* q_rope, const float* cache, float* out,
                                           float* ml, int heads, int l_dim, int r_dim, int pos0,
                                           const unsigned* row_shift, int cache_rows, int split_keys, float scale,
                                           int settled) {
    int h = blockIdx.x, t = blockIdx.y, sp = blockIdx.z, splits = gridDim.z;
    int wid = threadIdx.x >> 5;
    int w = l_dim + r_dim;
    const float* a = q_lat + ((size_t)t * heads + h) * l_dim;
    const float* b = q_rope + ((size_t)t * heads + h) * r_dim;
    int j0, j1;
    att_keys(pos0, row_shift, cache_rows, split_keys, t, sp, j0, j1);
    float m = ATT_NEG_INF, l = 0.0f, acc[ATT_MAX_DV_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_MAX_DV_PER_LANE; c++) acc[c] = 0.0f;
    float qa[ATT_MAX_DV_PER_LANE], qb[NR], ra[2][ATT_MAX_DV_PER_LANE], rb[2][NR];
    // Row j into buffer i; past the keys a row in range is read (or nothing, when not EXACT)
    // and never scored.
    auto fetch = [&](int j, int i) {
        const bool live = j < j1;
        const float* row = cache + (size_t)max(min(j, j1 - 1), 0) * w;
        lane_load<ATT_MAX_DV_PER_LANE, EXACT>(row, live ? l_dim : 0, ra[i]);
        lane_load<NR, EXACT>(row + l_dim, live ? r_dim : 0, rb[i]);
    };
    auto score = [&](int i) {
        float s1 = lane_dot<ATT_MAX_DV_PER_LANE>(qa, ra[i]);
        float s2 = lane_dot<NR>(qb, rb[i]);
        float s = (warp_sum(s1) + warp_sum(s2)) * scale;
        att_step<EXACT>(s, ra[i], l_dim, m, l, acc);
    };
    // The warp's first row, when it lies below the step's first position and is settled, is read
    // before the wait (as in gqa_decode).
    const bool early = settled && j0 + wid < pos0 + (int)*row_shift;
    if (early) fetch(j0 + wid, 0);
    pdl_wait(); // no early trigger: see the file comment
    if (!early) fetch(j0 + wid, 0);
    lane_load<ATT_MAX_DV_PER_LANE, EXACT>(a, l_dim, qa);
    lane_load<NR, EXACT>(b, r_dim, qb);
    for (int j = j0 + wid; j < j1; j += 2 * ATT_WARPS) {
        fetch(j + ATT_WARPS, 1);
        score(0);
        if (j + ATT_WARPS >= j1) break;
        fetch(j + 2 * ATT_WARPS, 0);
        score(1);
    }
    size_t r = ((size_t)t * heads + h) * splits + sp;
    att_merge(m, l, acc, l_dim, out + r * l_dim, splits > 1 ? ml + r * 2 : 0);
}

#define MLA_DECODE(NAME, NR, EXACT)                                                                             \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                 \
        NAME(const float* q_lat, const float* q_rope, const float* cache, float* out, float* ml, int heads,     \
             int l_dim, int r_dim, int pos0, const unsigned* row_shift, int cache_rows, int split_keys,          \
             float scale, int settled) {                                                                         \
        mla_decode<NR, EXACT>(q_lat, q_rope, cache, out, ml, heads, l_dim, r_dim, pos0, row_shift, cache_rows, \
                              split_keys, scale, settled);                                                       \
    }
MLA_DECODE(attention_mla_f32, ATT_MAX_ROPE_PER_LANE, false)
MLA_DECODE(attention_mla_l512_r64_f32, 2, true)

// The splits of each (query, head) row, merged: part [rows, splits, dv], ml [rows, splits, 2]
// -> out [rows, dv], splits <= ATT_MAX_SPLITS. grid (rows, ceil(dv / 32)), block COMBINE_GROUPS
// warps: a block owns 32 value columns, warp g sums splits g, g + COMBINE_GROUPS, ... in order,
// and the warps' sums are added in warp order (deterministic). A split with no keys has max -inf.
// The first warp turns the (max, sum) pairs into per-split weights once; reading them from global
// memory in every thread's loop made this a chain of dependent loads (18 us per Qwen3 decode
// call, 57 us for MLA's 512-wide rows), and one block per row walking all splits for its columns
// in turn left GLM's 20 rows at 11 us. (The weights sat in dynamic shared memory of exactly
// `splits` floats, and compute-sanitizer caught an unrolled loop reading past the last one.)
#define ATT_MAX_SPLITS 128
#define COMBINE_GROUPS 4
extern "C" __global__ void __launch_bounds__(COMBINE_GROUPS * 32)
    attention_combine(const float* part, const float* ml, float* out, int splits, int dv) {
    pdl_wait(); // no early trigger: see the file comment
    __shared__ float wsplit[ATT_MAX_SPLITS];
    __shared__ float total;
    __shared__ float sums[COMBINE_GROUPS][32];
    const size_t r = blockIdx.x;
    const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
    const float* pm = ml + r * splits * 2;
    // This lane's values of its warp's splits, all requested before the weights are known (loaded
    // in the sum after the barrier, four at a time, they cost four more L2 round trips).
    constexpr int PER = ATT_MAX_SPLITS / COMBINE_GROUPS;
    const int d = blockIdx.y * 32 + lane;
    float pv[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int s = g + i * COMBINE_GROUPS;
        pv[i] = s < splits && d < dv ? part[(r * splits + s) * dv + d] : 0.0f;
    }
    if (g == 0) {
        float gm = ATT_NEG_INF;
        for (int s = lane; s < splits; s += 32) gm = fmaxf(gm, pm[2 * s]);
        gm = warp_max(gm);
        float gl = 0.0f;
        for (int s = lane; s < splits; s += 32) {
            float e = pm[2 * s] == ATT_NEG_INF ? 0.0f : expf(pm[2 * s] - gm);
            wsplit[s] = e;
            gl += pm[2 * s + 1] * e;
        }
        gl = warp_sum(gl);
        if (lane == 0) total = gl;
    }
    __syncthreads();
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int s = g + i * COMBINE_GROUPS;
        if (s < splits) v += pv[i] * wsplit[s];
    }
    sums[g][lane] = v;
    __syncthreads();
    if (g == 0 && d < dv) {
        float acc = sums[0][lane];
#pragma unroll
        for (int i = 1; i < COMBINE_GROUPS; i++) acc += sums[i][lane];
        out[r * dv + d] = acc / total;
    }
}

// The same products for a few rows (decode), where a 64-row tile is mostly idle:
// not transposed: y[m,h,j] = W[wr0 + j, :] . x[m,h,:], one warp per output, lanes along W's row;
extern "C" __global__ void head_linear_rows_small(W w, const float* x, float* y, int m_rows, int heads, int rph,
                                                  int row_start, int row_count) {
    pdl_wait(); // no early trigger: see the file comment
    size_t wid = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    size_t total = (size_t)m_rows * heads * row_count;
    if (wid >= total) return;
    int j = (int)(wid % row_count);
    size_t mh = wid / row_count;
    int h = (int)(mh % heads);
    const float* xh = x + mh * w.cols;
    int wr = h * rph + row_start + j;
    float s = 0.0f;
    for (int i = lane; i < w.cols; i += 32) s = fmaf(w_at(w, wr, i), xh[i], s);
    s = warp_sum(s);
    if (lane == 0) y[wid] = s;
}

// transposed: y[m,h,j] = sum_i W[wr0 + i, j] * x[m,h,i]. grid (ceil(cols / 32), heads, M), block
// 256: lane = output column (coalesced along W's row), the 8 warps split i and their partial sums
// are added in warp order (deterministic).
extern "C" __global__ void __launch_bounds__(256)
head_linear_cols_small(W w, const float* x, float* y, int m_rows, int heads, int rph, int row_start,
                       int row_count) {
    pdl_wait(); // no early trigger: see the file comment
    __shared__ float red[8][32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int h = blockIdx.y, m = blockIdx.z, j = blockIdx.x * 32 + lane;
    const float* xh = x + ((size_t)m * heads + h) * row_count;
    int per = (row_count + 7) / 8;
    int i0 = wid * per, i1 = min(row_count, i0 + per);
    int wr0 = h * rph + row_start;
    float s = 0.0f;
    if (j < w.cols)
        for (int i = i0; i < i1; i++) s = fmaf(w_at(w, wr0 + i, j), xh[i], s);
    red[wid][lane] = s;
    __syncthreads();
    if (wid == 0 && j < w.cols) {
        float t = 0.0f;
        for (int q = 0; q < 8; q++) t += red[q][lane];
        y[((size_t)m * heads + h) * w.cols + j] = t;
    }
}
