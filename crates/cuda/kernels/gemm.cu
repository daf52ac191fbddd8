// Prefill products (many activation rows): an FP4 x bf16 tensor-core GEMM, and a plain f32 SIMT
// GEMM for dense weights (routers, embeddings used as heads), which must stay f32-exact.
//
// FP4 GEMM, y[m, n] = sum_k A[m, k] * W[n, k] (A bf16, padded to kp columns):
// - tile BM x BN x BK, 4 warps as 2 x 2, each warp 32 rows x BN/2 columns of m16n8k16 bf16
//   `mma.sync` with f32 accumulators;
// - A tiles and raw FP4 code/scale tiles are copied global -> shared with `cp.async`, GEMM_STAGES
//   deep, so the copy of tile k+2 overlaps the math of tile k;
// - codes are dequantized in registers right before the mma: one lookup in a 256-entry shared
//   table (built from the generated fp4.cuh) turns a code byte into the bf16x2 pair the B
//   fragment needs (element 2j in the low half, exactly the mma's k order), then one bf16x2
//   multiply by the block scale. (A per-lane replicated nibble table, conflict-free but two
//   lookups per byte, measured 15-35% slower on the H100.) e2m1 x e4m3 and e2m1 x e8m0
//   products are exact in bf16, so B carries no rounding; the f32 tensor scale is applied to the
//   accumulators;
// - f32 activations must stay f32-accurate (the conformance tolerance is f32 summation noise),
//   so the TERMS > 1 variants take A as a sum of bf16 terms, t0 = bf16(x), t1 = bf16(x - t0),
//   t2 = bf16(x - t0 - t1), and run one mma per term and B fragment. Residual per element:
//   2^-18 |x| with two terms, 2^-27 |x| (below f32 rounding) with three. bf16 activations use
//   one term. The B fragment is decoded once for all terms;
// - shared layouts are XOR-swizzled by 16-byte chunk so ldmatrix and the 8-byte code reads of a
//   warp hit distinct banks.
// The same kernel serves the grouped MoE path: `a_map` gathers A rows (token of each sorted
// (token, slot) pair), `block_expert` picks each M-block's expert, `gated` fuses SiLU(gate) * up
// into the epilogue (each warp's columns hold gate and up rows of the same outputs), and
// `row_scale` fuses the router weight into the down projection.
#include "common.cuh"

#define GEMM_BM 64
#define GEMM_BK 128
#define GEMM_STAGES 3
#define GEMM_THREADS 128
#define GEMM_SCALE_BYTES 8 // per row per k-tile: BK/16 NVFP4 codes (MXFP4 uses the first BK/32)

struct GemmArgs {
    const u16* a;              // bf16 [rows, a_stride] (term 0)
    const u16* a_lo;           // term 1, same layout (TERMS >= 2)
    const u16* a_lo2;          // term 2, same layout (TERMS == 3)
    const int* a_map;          // nullable: A row of tile row m is a_map[m] / a_div; < 0 = zero row
    const int* block_expert;   // nullable: expert of M-block blockIdx.y
    const int* m_ptr;          // nullable: valid row count on the device (grouped path)
    float* out;                // f32 [M, out_stride] (gated == 0)
    u16* out_bf16;             // bf16 [M, out_stride] (gated == 1)
    u16* out_bf16_lo;          // nullable: term 1 of the gated output (feeds a TERMS == 2 GEMM)
    const float* row_scale;    // nullable: output row m is scaled by row_scale[row_scale_map[m]]
    const int* row_scale_map;  // (or row_scale[m] without a map); map < 0 = padding row, not written
    int a_stride, a_div, m, n; // n: output columns (gated: the intermediate size I)
    int out_stride, rows_per_expert, gated, pad_;
};

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

template <int BN, int TERMS>
struct GemmSmem {
    static const int A_TERM = GEMM_BM * GEMM_BK * 2;
    static const int A_BYTES = A_TERM * TERMS;
    static const int B_BYTES = BN * GEMM_BK / 2;
    static const int S_BYTES = BN * GEMM_SCALE_BYTES;
    static const int STAGE = A_BYTES + B_BYTES + S_BYTES;
    static const int TOTAL = GEMM_STAGES * STAGE + 2 * 256 * 4;
};

// Weight row feeding local B-tile row r, or -1 (zero fill).
template <int BN>
__device__ __forceinline__ int b_row(const GemmArgs& g, int n0_blk, int r, int expert_row0) {
    if (!g.gated) {
        int n = n0_blk * BN + r;
        return n < g.n ? expert_row0 + n : -1;
    }
    const int half = BN / 4; // gate (then up) columns per warp column
    int wn = r / (BN / 2), rr = r % (BN / 2);
    int j = n0_blk * (BN / 2) + wn * half + (rr % half);
    if (j >= g.n) return -1;
    return expert_row0 + (rr < half ? j : g.n + j);
}

template <int BN, int TERMS>
__device__ void gemm_fp4_body(W w, GemmArgs g, u8* smem) {
    typedef GemmSmem<BN, TERMS> L;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int m0 = blockIdx.y * GEMM_BM;
    const int m_total = g.m_ptr ? *g.m_ptr : g.m;
    if (m0 >= m_total) return;
    const int expert = g.block_expert ? g.block_expert[blockIdx.y] : 0;
    const int expert_row0 = expert * g.rows_per_expert;
    const bool nv = w.kind == KIND_NVFP4;
    const int kt_count = w.kp / GEMM_BK;
    const int cb = w.kp / 2, nb = w.kp / fp4_block(w.kind);

    u32* lut2 = (u32*)(smem + GEMM_STAGES * L::STAGE); // code byte -> bf16x2 (element 2j low)
    u32* scale2 = lut2 + 256;                          // scale code -> bf16x2 (s, s)
    for (int i = tid; i < 256; i += GEMM_THREADS) {
        u32 lo = f32_to_bf16(fp4_e2m1(i & 15)), hi = f32_to_bf16(fp4_e2m1(i >> 4));
        lut2[i] = lo | (hi << 16);
        u32 s = f32_to_bf16(fp4_scale(w.kind, i));
        scale2[i] = s | (s << 16);
    }

    // Fixed per-thread copy assignments: A rows (8 per thread) and B rows.
    long long a_off[8]; // element offset of this thread's A chunk, -1 = zero row
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int row = tid / 16 + 8 * j;
        int gm = m0 + row;
        int ar = gm < m_total ? gm : -1;
        if (ar >= 0 && g.a_map) {
            int v = g.a_map[gm];
            ar = v < 0 ? -1 : v / g.a_div;
        }
        a_off[j] = ar < 0 ? -1 : (long long)ar * g.a_stride + (tid % 16) * 8;
    }
    const int BCH = BN / 32; // 16-byte code chunks per thread per stage
    int b_src_row[BCH];
#pragma unroll
    for (int j = 0; j < BCH; j++) b_src_row[j] = b_row<BN>(g, blockIdx.x, (tid + GEMM_THREADS * j) / 4, expert_row0);
    const int s_row = tid < BN ? b_row<BN>(g, blockIdx.x, tid, expert_row0) : -1;

    auto load_stage = [&](int st, int kt) {
        u8* base = smem + st * L::STAGE;
        u16* sa = (u16*)base;
        u8* sb = base + L::A_BYTES;
        u8* ss = sb + L::B_BYTES;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int row = tid / 16 + 8 * j, ch = tid % 16;
            int sw = row * GEMM_BK + ((ch ^ (row & 7)) * 8);
            bool ok = a_off[j] >= 0;
            cp_async16(sa + sw, ok ? (const void*)(g.a + a_off[j] + kt * GEMM_BK) : (const void*)g.a, ok);
            if (TERMS >= 2)
                cp_async16(sa + GEMM_BM * GEMM_BK + sw,
                           ok ? (const void*)(g.a_lo + a_off[j] + kt * GEMM_BK) : (const void*)g.a_lo, ok);
            if (TERMS >= 3)
                cp_async16(sa + 2 * GEMM_BM * GEMM_BK + sw,
                           ok ? (const void*)(g.a_lo2 + a_off[j] + kt * GEMM_BK) : (const void*)g.a_lo2, ok);
        }
#pragma unroll
        for (int j = 0; j < BCH; j++) {
            int ch = tid + GEMM_THREADS * j;
            int row = ch / 4, c = ch % 4;
            int wr = b_src_row[j];
            void* dst = sb + row * (GEMM_BK / 2) + ((c ^ ((row >> 1) & 3)) * 16);
            const u8* src = wr >= 0 ? w.codes + (size_t)wr * cb + kt * (GEMM_BK / 2) + c * 16 : w.codes;
            cp_async16(dst, src, wr >= 0);
        }
        if (tid < BN) {
            void* dst = ss + tid * GEMM_SCALE_BYTES;
            if (nv) {
                const u8* src = s_row >= 0 ? w.scales + (size_t)s_row * nb + kt * (GEMM_BK / 16) : w.scales;
                cp_async8(dst, src, s_row >= 0);
            } else {
                const u8* src = s_row >= 0 ? w.scales + (size_t)s_row * nb + kt * (GEMM_BK / 32) : w.scales;
                cp_async4(dst, src, s_row >= 0);
            }
        }
    };

    const int NS = BN / 16; // n8 subtiles per warp
    float acc[2][NS][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int s = 0; s < NS; s++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][s][c] = 0.0f;

#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < kt_count) load_stage(s, s);
        cp_async_commit();
    }
    __syncthreads(); // tables visible

    for (int kt = 0; kt < kt_count; kt++) {
        cp_async_wait<GEMM_STAGES - 2>();
        __syncthreads();
        int nk = kt + GEMM_STAGES - 1;
        if (nk < kt_count) load_stage(nk % GEMM_STAGES, nk);
        cp_async_commit();

        const u8* base = smem + (kt % GEMM_STAGES) * L::STAGE;
        const u16* sa = (const u16*)base;
        const u8* sb = base + L::A_BYTES;
        const u8* ss = sb + L::B_BYTES;
#pragma unroll
        for (int ks = 0; ks < GEMM_BK / 16; ks++) {
            u32 af[TERMS][2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                int row = wm * 32 + mt * 16 + (lane % 16);
                int ch = ks * 2 + lane / 16;
#pragma unroll
                for (int tm = 0; tm < TERMS; tm++)
                    ldmatrix_x4(af[tm][mt], sa + tm * GEMM_BM * GEMM_BK + row * GEMM_BK + ((ch ^ (row & 7)) * 8));
            }
#pragma unroll
            for (int s = 0; s < NS; s++) {
                int row = wn * (BN / 2) + s * 8 + lane / 4;
                const u8* rp = sb + row * (GEMM_BK / 2) + (((ks >> 1) ^ ((row >> 1) & 3)) * 16) + (ks & 1) * 8;
                uint2 q = *(const uint2*)rp;
                u32 sc = scale2[ss[row * GEMM_SCALE_BYTES + (nv ? ks : ks >> 1)]];
                int sh = (lane % 4) * 8;
                u32 b0 = bf16x2_mul(lut2[(q.x >> sh) & 255u], sc);
                u32 b1 = bf16x2_mul(lut2[(q.y >> sh) & 255u], sc);
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int tm = 0; tm < TERMS; tm++) mma_bf16(acc[mt][s], af[tm][mt], b0, b1);
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue.
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int hrow = 0; hrow < 2; hrow++) {
            int m = m0 + wm * 32 + mt * 16 + lane / 4 + hrow * 8;
            if (m >= m_total) continue;
            float rs = 1.0f;
            if (g.row_scale) {
                int idx = m;
                if (g.row_scale_map) {
                    idx = g.row_scale_map[m];
                    if (idx < 0) continue;
                }
                rs = g.row_scale[idx];
            }
            if (!g.gated) {
#pragma unroll
                for (int s = 0; s < NS; s++) {
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        int n = blockIdx.x * BN + wn * (BN / 2) + s * 8 + (lane % 4) * 2 + c;
                        if (n >= g.n) continue;
                        int wr = expert_row0 + n;
                        float v = acc[mt][s][hrow * 2 + c] * w.tscales[wr / w.rows_per_ts];
                        g.out[(size_t)m * g.out_stride + n] = v * rs;
                    }
                }
            } else {
#pragma unroll
                for (int s = 0; s < NS / 2; s++) {
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        int j = blockIdx.x * (BN / 2) + wn * (BN / 4) + s * 8 + (lane % 4) * 2 + c;
                        if (j >= g.n) continue;
                        float gate = acc[mt][s][hrow * 2 + c] * w.tscales[(expert_row0 + j) / w.rows_per_ts];
                        float up = acc[mt][s + NS / 2][hrow * 2 + c] *
                                   w.tscales[(expert_row0 + g.n + j) / w.rows_per_ts];
                        float v = silu_f(gate) * up * rs;
                        u16 hi = f32_to_bf16(v);
                        g.out_bf16[(size_t)m * g.out_stride + j] = hi;
                        if (g.out_bf16_lo) g.out_bf16_lo[(size_t)m * g.out_stride + j] = f32_to_bf16(v - bf16_to_f32(hi));
                    }
                }
            }
        }
    }
}

#define GEMM_FP4(BN, TERMS, NAME)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) NAME(W w, GemmArgs g) {                           \
        extern __shared__ __align__(16) u8 smem[];                                                               \
        pdl_enter();                                                                                             \
        gemm_fp4_body<BN, TERMS>(w, g, smem);                                                                    \
    }
GEMM_FP4(64, 1, gemm_fp4_bf16_n64)
GEMM_FP4(128, 1, gemm_fp4_bf16_n128)
GEMM_FP4(64, 2, gemm_fp4_bf16x2_n64)
GEMM_FP4(128, 2, gemm_fp4_bf16x2_n128)
GEMM_FP4(64, 3, gemm_fp4_bf16x3_n64)
GEMM_FP4(128, 3, gemm_fp4_bf16x3_n128)

// Dense weights: y [M, N] = x [M, K] (f32) . W^T in f32, 64 x 64 tiles, 4 x 4 outputs per thread.
#define DG_T 64
#define DG_K 16
extern "C" __global__ void __launch_bounds__(256) gemm_dense_f32(W w, const float* x, float* y, int m_rows) {
    pdl_enter();
    __shared__ float sx[DG_K][DG_T + 1];
    __shared__ float sw[DG_K][DG_T + 1];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int m0 = blockIdx.y * DG_T, n0 = blockIdx.x * DG_T;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < w.cols; k0 += DG_K) {
        for (int i = threadIdx.x; i < DG_T * DG_K; i += 256) {
            int r = i / DG_K, kk = i % DG_K;
            int gm = m0 + r, gn = n0 + r, gk = k0 + kk;
            sx[kk][r] = (gm < m_rows && gk < w.cols) ? x[(size_t)gm * w.cols + gk] : 0.0f;
            sw[kk][r] = (gn < w.rows && gk < w.cols) ? w_at(w, gn, gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < DG_K; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = sx[kk][ty * 4 + i]; b[i] = sw[kk][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
            if (m < m_rows && n < w.rows) y[(size_t)m * w.rows + n] = acc[i][j];
        }
}
