// Prefill products (many activation rows): an FP4 x bf16 tensor-core GEMM, and a plain f32 SIMT
// GEMM for dense weights (routers, embeddings used as heads), which must stay f32-exact.
//
// FP4 GEMM, y[m, n] = sum_k A[m, k] * W[n, k] (A bf16, padded to kp columns):
// - tile BM (32 or 64) x BN x GEMM_BK, 8 warps side by side, each all BM rows x BN/8 columns of
//   m16n8k16 bf16 `mma.sync` with f32 accumulators. Wide tiles because every A element is
//   reused by BN columns only (the first kernel's 64 x 64 tiles with two A terms fetched ~13 GB
//   from L2 for one Qwen3 MoE layer at 8192 tokens); 64 rows per warp because each decoded B
//   fragment then feeds 4 x TERMS mma (ncu: with 32-row warps the loop ran ~10 instructions per
//   mma, the scheduler issuing 56 % of cycles, the tensor pipe 36 %). 128-row tiles (2 x 4
//   warps) measured slower in every MoE case: at ~190 registers one block of 8 warps per SM,
//   where 64 x 128 tiles fit two;
// - A tiles and raw FP4 code/scale tiles are copied global -> shared with `cp.async`, STAGES
//   deep (GemmSmem), so the copy of later tiles overlaps the math of this one;
// - codes are decoded in registers right before the mma, as the decode kernels do (gemv.cu): a
//   lane's B fragment is elements 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of its weight row, i.e. byte
//   t of each 8-byte half of the row's 16-column chunk. One byte permute puts byte t of both
//   halves where fp4_e2m1_pair_bf16 reads (nibbles 3 and 7: the odd elements; shifted by 4, the
//   even ones), a bf16 multiply by the block scale (scale_pair) makes them exact values, and two
//   byte permutes pair them up as the mma wants. (A 256-entry shared table per code byte cost
//   random-bank lookups: about as many shared-memory wavefronts as the mma had cycles.) Row
//   factors (tensor scale, 2^s_off: row_tscale) are applied to the f32 accumulators;
// - f32 activations must stay f32-accurate (the conformance tolerance is f32 summation noise),
//   so the TERMS > 1 variants take A as a sum of bf16 terms, t0 = bf16(x), t1 = bf16(x - t0),
//   t2 = bf16(x - t0 - t1), and run one mma per term and B fragment. Residual per element:
//   2^-18 |x| with two terms, 2^-27 |x| (below f32 rounding) with three. bf16 activations use
//   one term. The B fragment is decoded once for all terms;
// - shared layouts are XOR-swizzled by 16-byte chunk so ldmatrix and the code reads of a warp
//   hit distinct banks.
// The same kernel serves the grouped MoE path: `a_map` gathers A rows (token of each sorted
// (token, slot) pair), `block_expert` picks each M-block's expert, `gated` fuses SiLU(gate) * up
// into the epilogue (each warp's columns hold gate and up rows of the same outputs), and
// `row_scale` fuses the router weight into the down projection.
#include "common.cuh"

#define GEMM_BK 64
#define GEMM_WARPS 8
#define GEMM_THREADS (GEMM_WARPS * 32)
#define GEMM_SCALE_BYTES 4 // per row per k-tile: BK/16 NVFP4 codes, or the aligned MXFP4 word holding BK/32
#define GEMM_SMEM_MAX (110 * 1024) // two blocks per SM

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
    int out_stride, rows_per_expert, gated;
    // Batched products (grid.z, MLA's per-head products): slice z reads A from element z * a_z,
    // writes from element z * out_z and uses weight rows from w_row0 + z * w_z.
    int a_z, out_z, w_z, w_row0, pad_;
};

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// Shared memory of one block: STAGES x (A tiles, code tile, scale tile), then the NVFP4 scale
// table. The host's gemm_smem (src/backend.rs) computes the same total.
template <int BM, int BN, int TERMS>
struct GemmSmem {
    static const int A_TERM = BM * GEMM_BK * 2;
    static const int A_BYTES = A_TERM * TERMS;
    static const int B_BYTES = BN * GEMM_BK / 2;
    static const int S_BYTES = BN * GEMM_SCALE_BYTES;
    static const int STAGE = A_BYTES + B_BYTES + S_BYTES;
    static const int STAGES = (GEMM_SMEM_MAX / STAGE) < 4 ? (GEMM_SMEM_MAX / STAGE) : 4;
    static const int TOTAL = STAGES * STAGE + (int)sizeof(Fp4Lut);
};

// Weight row feeding local B-tile row r, or -1 (zero fill). Gated: each warp column's rows are
// gate rows, then the up rows of the same outputs.
template <int BN>
__device__ __forceinline__ int b_row(const GemmArgs& g, int r, int expert_row0) {
    if (!g.gated) {
        int n = blockIdx.x * BN + r;
        return n < g.n ? expert_row0 + n : -1;
    }
    const int WC = BN / GEMM_WARPS, half = WC / 2;
    int wn = r / WC, rr = r % WC;
    int j = blockIdx.x * (BN / 2) + wn * half + (rr % half);
    if (j >= g.n) return -1;
    return expert_row0 + (rr < half ? j : g.n + j);
}

template <int BM, int BN, int TERMS>
__device__ void gemm_fp4_body(W w, GemmArgs g, u8* smem) {
    typedef GemmSmem<BM, BN, TERMS> L;
    const int STAGES = L::STAGES;
    const int WC = BN / GEMM_WARPS;            // columns per warp
    const int MT = BM / 16, NS = WC / 8;       // m16 tiles and n8 tiles per warp
    const int tid = threadIdx.x, lane = tid & 31, wn = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int m0 = blockIdx.y * BM;
    const int m_total = g.m_ptr ? *g.m_ptr : g.m;
    if (m0 >= m_total) return;
    const int expert = g.block_expert ? g.block_expert[blockIdx.y] : 0;
    const int expert_row0 = expert * g.rows_per_expert + g.w_row0 + blockIdx.z * g.w_z;
    const size_t out_z = (size_t)blockIdx.z * g.out_z;
    const bool nv = w.kind == KIND_NVFP4;
    const int kt_count = w.kp / GEMM_BK;
    const int cb = w.kp / 2, nb = w.kp / fp4_block(w.kind);

    Fp4Lut* lut = (Fp4Lut*)(smem + STAGES * L::STAGE);
    lut_init(lut, w);

    // Fixed per-thread copy assignments: A chunks (16 bytes: 8 of a row's 64 columns), code
    // chunks (a row's 32 bytes are two chunks), one scale word per B row.
    const int ACH = BM * 8 / GEMM_THREADS, BCH = BN * 2 / GEMM_THREADS;
    long long a_off[ACH]; // element offset of this thread's A chunk, -1 = zero row
#pragma unroll
    for (int j = 0; j < ACH; j++) {
        int row = (tid + GEMM_THREADS * j) / 8;
        int gm = m0 + row;
        int ar = gm < m_total ? gm : -1;
        if (ar >= 0 && g.a_map) {
            int v = g.a_map[gm];
            ar = v < 0 ? -1 : v / g.a_div;
        }
        a_off[j] = ar < 0 ? -1 : (long long)ar * g.a_stride + (long long)blockIdx.z * g.a_z + (tid % 8) * 8;
    }
    int b_src_row[BCH];
#pragma unroll
    for (int j = 0; j < BCH; j++) b_src_row[j] = b_row<BN>(g, (tid + GEMM_THREADS * j) / 2, expert_row0);
    const int s_row = tid < BN ? b_row<BN>(g, tid, expert_row0) : -1;

    auto load_stage = [&](int st, int kt) {
        u8* base = smem + st * L::STAGE;
        u16* sa = (u16*)base;
        u8* sb = base + L::A_BYTES;
        u8* ss = sb + L::B_BYTES;
#pragma unroll
        for (int j = 0; j < ACH; j++) {
            int row = (tid + GEMM_THREADS * j) / 8, ch = tid % 8;
            int sw = row * GEMM_BK + ((ch ^ (row & 7)) * 8);
            bool ok = a_off[j] >= 0;
            size_t off = ok ? a_off[j] + kt * GEMM_BK : 0;
            cp_async16(sa + sw, g.a + off, ok);
            if (TERMS >= 2) cp_async16(sa + L::A_TERM / 2 + sw, g.a_lo + off, ok);
            if (TERMS >= 3) cp_async16(sa + L::A_TERM + sw, g.a_lo2 + off, ok);
        }
#pragma unroll
        for (int j = 0; j < BCH; j++) {
            int ch = tid + GEMM_THREADS * j;
            int row = ch / 2, c = ch % 2;
            int wr = b_src_row[j];
            void* dst = sb + row * (GEMM_BK / 2) + ((c ^ ((row >> 2) & 1)) * 16);
            const u8* src = wr >= 0 ? w.codes + (size_t)wr * cb + kt * (GEMM_BK / 2) + c * 16 : w.codes;
            cp_async16(dst, src, wr >= 0);
        }
        if (tid < BN) {
            // NVFP4: this tile's BK/16 codes. MXFP4: the aligned word of four codes holding this
            // tile's two (nb is a multiple of 4: kp is a multiple of FP4_KP_ALIGN).
            int first = nv ? kt * (GEMM_BK / 16) : (kt * (GEMM_BK / 32)) & ~3;
            const u8* src = s_row >= 0 ? w.scales + (size_t)s_row * nb + first : w.scales;
            cp_async4(ss + tid * GEMM_SCALE_BYTES, src, s_row >= 0);
        }
    };

    float acc[MT][NS][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int s = 0; s < NS; s++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][s][c] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < kt_count) load_stage(s, s);
        cp_async_commit();
    }

    // Per-lane parts of the fragment addresses, fixed for the whole loop. ldmatrix: lane l gives
    // row l % 16 of each 16-row tile and 16-byte chunk 2 ks + l / 16, stored at chunk ^ (row & 7)
    // = (2 ks) ^ a_x. Codes: the lane's row r = wn * WC + s * 8 + gq has (r >> 2) & 1 = b_x.
    const int a_lane = (lane % 16) * GEMM_BK, a_x = (lane / 16) ^ (lane & 7);
    const int b_lane = (wn * WC + gq) * (GEMM_BK / 2), b_x = (gq >> 2) & 1;
    const u32 b_sel = (tq << 4) | ((4 + tq) << 12);

    for (int kt = 0; kt < kt_count; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int nk = kt + STAGES - 1;
        if (nk < kt_count) load_stage(nk % STAGES, nk);
        cp_async_commit();

        const u8* base = smem + (kt % STAGES) * L::STAGE;
        const u16* sa = (const u16*)base;
        const u8* sb = base + L::A_BYTES;
        const u32* ss = (const u32*)(sb + L::B_BYTES);
        // Block-scale pairs of this lane's B rows for each 16-column step: MXFP4 uses byte
        // (kt & 1) * 2 + ks / 2 of the row's scale word, NVFP4 byte ks (through the shared
        // table). Looked up once per tile where registers allow (NS <= 2), else per step.
        const int SPT = NS <= 2 ? GEMM_BK / 16 : 1;
        u32 sw[NS], sp[NS][SPT];
        auto scale_of = [&](u32 word, int ks) {
            const u32 code = nv ? (word >> (8 * ks)) & 255u : (word >> ((kt & 1) * 16 + 8 * (ks >> 1))) & 255u;
            return scale_pair(lut, w, code);
        };
#pragma unroll
        for (int s = 0; s < NS; s++) {
            sw[s] = ss[wn * WC + s * 8 + gq];
            if (SPT > 1)
#pragma unroll
                for (int ks = 0; ks < SPT; ks++) sp[s][ks] = scale_of(sw[s], ks);
        }
#pragma unroll
        for (int ks = 0; ks < GEMM_BK / 16; ks++) {
            const u16* a_step = sa + a_lane + ((a_x ^ (2 * ks)) * 8);
            const u8* b_step = sb + b_lane + (((ks >> 1) ^ b_x) * 16) + (ks & 1) * 8;
            // Every B fragment of the step first, then per term its A fragments and the mma, in
            // an order where consecutive mma feed different accumulators (term-inner order
            // chained each mma on the one before). One term's A fragments at a time keeps the
            // 256-column tiles within 128 registers.
            u32 bf[NS][2];
#pragma unroll
            for (int s = 0; s < NS; s++) {
                const uint2 q = *(const uint2*)(b_step + s * 8 * (GEMM_BK / 2));
                const u32 s2 = SPT > 1 ? sp[s][ks % SPT] : scale_of(sw[s], ks);
                // byte t of each half at bytes 1 and 3: nibbles 3 and 7 are elements 2t+1, 2t+9;
                // shifted by 4, elements 2t, 2t+8.
                const u32 v = __byte_perm(q.x, q.y, b_sel);
                const u32 odd = bf16x2_mul(fp4_e2m1_pair_bf16(v), s2);
                const u32 even = bf16x2_mul(fp4_e2m1_pair_bf16(v << 4), s2);
                bf[s][0] = __byte_perm(even, odd, 0x5410);
                bf[s][1] = __byte_perm(even, odd, 0x7632);
            }
#pragma unroll
            for (int tm = 0; tm < TERMS; tm++) {
                u32 af[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) ldmatrix_x4(af[mt], a_step + (tm * BM + mt * 16) * GEMM_BK);
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int s = 0; s < NS; s++) mma_bf16(acc[mt][s], af[mt], bf[s][0], bf[s][1]);
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue.
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hrow = 0; hrow < 2; hrow++) {
            int m = m0 + mt * 16 + gq + hrow * 8;
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
                        int n = blockIdx.x * BN + wn * WC + s * 8 + tq * 2 + c;
                        if (n >= g.n) continue;
                        float v = acc[mt][s][hrow * 2 + c] * row_tscale(w, expert_row0 + n);
                        g.out[out_z + (size_t)m * g.out_stride + n] = v * rs;
                    }
                }
            } else {
#pragma unroll
                for (int s = 0; s < NS / 2; s++) {
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        int j = blockIdx.x * (BN / 2) + wn * (WC / 2) + s * 8 + tq * 2 + c;
                        if (j >= g.n) continue;
                        float gate = acc[mt][s][hrow * 2 + c] * row_tscale(w, expert_row0 + j);
                        float up = acc[mt][s + NS / 2][hrow * 2 + c] * row_tscale(w, expert_row0 + g.n + j);
                        float v = silu_f(gate) * up * rs;
                        u16 hi = f32_to_bf16(v);
                        g.out_bf16[out_z + (size_t)m * g.out_stride + j] = hi;
                        if (g.out_bf16_lo)
                            g.out_bf16_lo[out_z + (size_t)m * g.out_stride + j] = f32_to_bf16(v - bf16_to_f32(hi));
                    }
                }
            }
        }
    }
}

// gemm_fp4_t{TERMS}_m{BM}_n{BN}. Two blocks per SM: at most 128 registers (one term's A
// fragments live at a time) and GEMM_SMEM_MAX of shared memory each (three-term tiles take 3
// stages). 32-row tiles serve MoE prefills with few rows per expert (each expert's rows are
// padded to whole tiles) and short inputs.
#define GEMM_FP4(BM, BN, TERMS)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)                                                \
        gemm_fp4_t##TERMS##_m##BM##_n##BN(W w, GemmArgs g) {                                                     \
        extern __shared__ __align__(16) u8 smem[];                                                               \
        pdl_enter();                                                                                             \
        gemm_fp4_body<BM, BN, TERMS>(w, g, smem);                                                                \
    }
#define GEMM_FP4_TERMS(BM, BN) GEMM_FP4(BM, BN, 1) GEMM_FP4(BM, BN, 2) GEMM_FP4(BM, BN, 3)
GEMM_FP4_TERMS(32, 128)
GEMM_FP4_TERMS(32, 256)
GEMM_FP4_TERMS(64, 128)
GEMM_FP4_TERMS(64, 256)

// f32 weights on the tensor cores (3xTF32, common.cuh): dense linears (routers) and MLA's
// per-head products, batched over H slices. Slice h of y [M, H, J] = x [M, H, I] . A_h, with
// w_h = w + h * w_rows * cols an f32 [w_rows, cols] matrix and
//   T false: A_h(i, j) = w_h[j, i]  (J = w_rows, I = cols): a linear, y = x . w_hᵀ
//   T true:  A_h(i, j) = w_h[i, j]  (I = w_rows, J = cols): MLA's W_UKᵀ (sums across the rows).
// Each warp owns 16 rows x COLS columns; x and the weights are split when the fragments are read.
// grid (ceil(J / COLS), ceil(M / FT_ROWS), H), block 128. Weights of other kinds are decoded to
// f32 first (decode_head_rows): decoding FP4 inside the product, once per element and block,
// was the whole cost of GLM's W_UK product (0.9 ms per call at 2048 tokens on the CUDA cores or
// the tensor cores alike). Replaces an f32 SIMT GEMM (routers: 0.15 ms per Qwen3 call at 2048).
#define FT_ROWS 64 // rows per block: 4 warps of 16
#define FT_K 32    // reduction step per stage (4 mma k-steps)

template <int COLS, bool T>
__device__ __forceinline__ void gemm_f32_tc_body(const float* w, const float* x, float* y, int m_rows, int heads,
                                                 int w_rows, int cols) {
    pdl_enter();
    // Row strides of 40 floats (8 mod 32): a half warp's 8-byte fragment reads (rows g, dims
    // 2t, 2t + 1) fall on distinct banks.
    __shared__ float xs[FT_ROWS][FT_K + 8];
    __shared__ float ws[COLS][FT_K + 8];
    const int h = blockIdx.z, m0 = blockIdx.y * FT_ROWS, j0 = blockIdx.x * COLS;
    const int ni = T ? w_rows : cols, nj = T ? cols : w_rows;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const float* wh = w + (size_t)h * w_rows * cols;
    float acc[COLS / 8][4];
#pragma unroll
    for (int nt = 0; nt < COLS / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.0f;
    constexpr int XN = FT_ROWS * FT_K / 128, WN = FT_K * COLS / 128;
    for (int i0 = 0; i0 < ni; i0 += FT_K) {
        // Every load of the step in flight before the stores.
        float xv[XN], wv[WN];
#pragma unroll
        for (int u = 0; u < XN; u++) {
            int e = tid + 128 * u, m = m0 + e / FT_K, i = i0 + e % FT_K;
            xv[u] = m < m_rows && i < ni ? x[((size_t)m * heads + h) * ni + i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < WN; u++) {
            // Consecutive threads walk w's rows: j when transposed, i otherwise.
            int e = tid + 128 * u;
            int i = i0 + (T ? e / COLS : e % FT_K), j = j0 + (T ? e % COLS : e / FT_K);
            wv[u] = i < ni && j < nj ? (T ? wh[(size_t)i * cols + j] : wh[(size_t)j * cols + i]) : 0.0f;
        }
        __syncthreads(); // the previous tiles are consumed
#pragma unroll
        for (int u = 0; u < XN; u++) {
            int e = tid + 128 * u;
            xs[e / FT_K][e % FT_K] = xv[u];
        }
#pragma unroll
        for (int u = 0; u < WN; u++) {
            int e = tid + 128 * u;
            ws[T ? e % COLS : e / FT_K][T ? e / COLS : e % FT_K] = wv[u];
        }
        __syncthreads();
#pragma unroll
        for (int st = 0; st < FT_K / 8; st++) {
            float2 x0 = *reinterpret_cast<const float2*>(&xs[warp * 16 + g][8 * st + 2 * t]);
            float2 x1 = *reinterpret_cast<const float2*>(&xs[warp * 16 + g + 8][8 * st + 2 * t]);
            const float a[4] = {x0.x, x1.x, x0.y, x1.y};
            u32 ah[4], al[4];
#pragma unroll
            for (int i = 0; i < 4; i++) tf32_split(a[i], ah[i], al[i]);
#pragma unroll
            for (int nt = 0; nt < COLS / 8; nt++) {
                float2 b = *reinterpret_cast<const float2*>(&ws[nt * 8 + g][8 * st + 2 * t]);
                mma_tf32x3(acc[nt], ah, al, b.x, b.y);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int m = m0 + warp * 16 + g + 8 * r;
        if (m >= m_rows) continue;
        float* dst = y + ((size_t)m * heads + h) * nj + j0 + 2 * t;
#pragma unroll
        for (int nt = 0; nt < COLS / 8; nt++) {
            const int j = j0 + nt * 8 + 2 * t;
            if (j < nj) dst[nt * 8] = acc[nt][2 * r];
            if (j + 1 < nj) dst[nt * 8 + 1] = acc[nt][2 * r + 1];
        }
    }
}

#define GEMM_F32_TC(NAME, COLS, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                                            \
        NAME(const float* w, const float* x, float* y, int m_rows, int heads, int w_rows, int cols) {            \
        gemm_f32_tc_body<COLS, T>(w, x, y, m_rows, heads, w_rows, cols);                                         \
    }
// Narrow outputs (routers: 64-128 columns) take 32-column tiles, so the grid still fills the GPU.
GEMM_F32_TC(gemm_f32_tc_n32, 32, false)
GEMM_F32_TC(gemm_f32_tc_n128, 128, false)
GEMM_F32_TC(gemm_f32_tc_t_n128, 128, true)

// Rows h * rph + row_start + r (r < row_count) of every head, decoded to f32:
// wd [heads, row_count, cols]. One thread per element.
extern "C" __global__ void decode_head_rows(W w, float* wd, int heads, int rph, int row_start, int row_count) {
    pdl_enter();
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)heads * row_count * w.cols) return;
    int j = (int)(e % w.cols), hr = (int)(e / w.cols);
    wd[e] = w_at(w, (hr / row_count) * rph + row_start + hr % row_count, j);
}
