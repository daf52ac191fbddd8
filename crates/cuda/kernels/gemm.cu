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
    // nullable (the wgmma kernel's grouped path): row tiles of two heights, BM and BM / 2, tile b
    // rows tile_m0[b] .. tile_m0[b + 1], *tile_count of them (moe_scan's mixed tiles).
    const int* tile_m0;
    const int* tile_count;
    float* out;                // f32 [M, out_stride] (gated == 0)
    u16* out_bf16;             // bf16 [M, out_stride] (gated == 1)
    u16* out_bf16_lo;          // nullable: term 1 of the gated output (feeds a TERMS == 2 GEMM)
    const float* row_scale;    // nullable: output row m is scaled by row_scale[row_scale_map[m]]
    const int* row_scale_map;  // (or row_scale[m] without a map); map < 0 = padding row, not written
    int a_stride, a_div, m, n; // n: output columns (gated: the intermediate size I)
    int out_stride, rows_per_expert, gated;
    // Batched products (grid.z, MLA's per-head products): slice z reads A from element z * a_z,
    // writes from element z * out_z and uses weight rows from w_row0 + z * w_z. `slices`: their
    // count, for the persistent wgmma kernel, which walks the tiles itself (1 where unbatched).
    int a_z, out_z, w_z, w_row0, slices;
};

// Shared memory of one block: STAGES x (A tiles, code tile, scale tile), then the NVFP4 scale
// table and the epilogue's factors. The host's gemm_smem (src/backend.rs) computes the same total.
template <int BM, int BN, int TERMS>
struct GemmSmem {
    static const int A_TERM = BM * GEMM_BK * 2;
    static const int A_BYTES = A_TERM * TERMS;
    static const int B_BYTES = BN * GEMM_BK / 2;
    static const int S_BYTES = BN * GEMM_SCALE_BYTES;
    static const int STAGE = A_BYTES + B_BYTES + S_BYTES;
    static const int STAGES = (GEMM_SMEM_MAX / STAGE) < 4 ? (GEMM_SMEM_MAX / STAGE) : 4;
    static const int EPI = (BN * 4 + BM * 5 + 15) / 16 * 16; // GemmEpi<BN, BM>
    static const int TOTAL = STAGES * STAGE + (int)sizeof(Fp4Lut) + EPI;
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

// This block's rows: the first (blockIdx.y * bm) and the valid count (on the device for the
// grouped path), its expert's first weight row and its batch slice's output offset. Blocks
// at or past the count return before reading further.
struct GemmTile {
    int m0, m_total, expert_row0;
    size_t out_z;
};
// Tile (by, bz) of a product with m_total valid rows.
__device__ __forceinline__ GemmTile gemm_tile_at(const GemmArgs& g, int bm, int m_total, int by, int bz) {
    GemmTile t;
    t.m0 = g.tile_m0 ? g.tile_m0[by] : by * bm;
    t.m_total = m_total;
    const int expert = g.block_expert && t.m0 < t.m_total ? g.block_expert[by] : 0;
    t.expert_row0 = expert * g.rows_per_expert + g.w_row0 + bz * g.w_z;
    t.out_z = (size_t)bz * g.out_z;
    return t;
}
__device__ __forceinline__ int gemm_m_total(const GemmArgs& g) { return g.m_ptr ? *g.m_ptr : g.m; }
__device__ __forceinline__ GemmTile gemm_tile(const GemmArgs& g, int bm) {
    return gemm_tile_at(g, bm, gemm_m_total(g), blockIdx.y, blockIdx.z);
}

// Element offsets of a thread's A chunks (16 bytes: 8 of a row's GEMM_BK columns; chunk j is
// row (tid + GEMM_THREADS j) / 8, column group tid % 8), -1 for a zero row. `a_map` gathers rows.
template <int ACH>
__device__ __forceinline__ void gemm_a_offsets(const GemmArgs& g, int m0, int m_total, long long (&a_off)[ACH]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int j = 0; j < ACH; j++) {
        int gm = m0 + (tid + GEMM_THREADS * j) / 8;
        int ar = gm < m_total ? gm : -1;
        if (ar >= 0 && g.a_map) {
            int v = g.a_map[gm];
            ar = v < 0 ? -1 : v / g.a_div;
        }
        a_off[j] = ar < 0 ? -1 : (long long)ar * g.a_stride + (long long)blockIdx.z * g.a_z + (tid % 8) * 8;
    }
}

// k-tile kt of every A term into `sa` (term t at t * BM rows), 16-byte chunk c of row r at
// chunk c ^ (r & 7): bank-conflict-free ldmatrix, and the 128-byte swizzle wgmma reads.
template <int BM, int TERMS, int ACH>
__device__ __forceinline__ void gemm_load_a(const GemmArgs& g, const long long (&a_off)[ACH], u16* sa, int kt) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int j = 0; j < ACH; j++) {
        int row = (tid + GEMM_THREADS * j) / 8, ch = tid % 8;
        int sw = row * GEMM_BK + ((ch ^ (row & 7)) * 8);
        bool ok = a_off[j] >= 0;
        size_t off = ok ? a_off[j] + kt * GEMM_BK : 0;
        cp_async16(sa + sw, g.a + off, ok);
        if (TERMS >= 2) cp_async16(sa + BM * GEMM_BK + sw, g.a_lo + off, ok);
        if (TERMS >= 3) cp_async16(sa + 2 * BM * GEMM_BK + sw, g.a_lo2 + off, ok);
    }
}

// Byte offset in a stage's code tile of 16-byte half h of B row r: the halves of rows 4..7 of
// every 8 swapped, so the 8-byte fragment reads of a warp's 8 rows hit distinct banks.
__device__ __forceinline__ int gemm_code_off(int r, int h) { return r * (GEMM_BK / 2) + ((h ^ ((r >> 2) & 1)) * 16); }

// Byte offset of this tile's block-scale word for the B row whose weight row is `wr` (NVFP4:
// the tile's BK/16 codes; MXFP4: the aligned word of four codes holding its two, nb being a
// multiple of 4 as kp is a multiple of FP4_KP_ALIGN), and the code of 16-column step ks in it.
__device__ __forceinline__ size_t gemm_scale_src(const W& w, int wr, int kt) {
    const bool nv = w.kind == KIND_NVFP4;
    int first = nv ? kt * (GEMM_BK / 16) : (kt * (GEMM_BK / 32)) & ~3;
    return (size_t)wr * (w.kp / fp4_block(w.kind)) + first;
}
__device__ __forceinline__ u32 gemm_scale_code(const W& w, u32 word, int kt, int ks) {
    return w.kind == KIND_NVFP4 ? (word >> (8 * ks)) & 255u : (word >> ((kt & 1) * 16 + 8 * (ks >> 1))) & 255u;
}

// One weight row's part of a 16-column step for lane (g, t) of an mma fragment: elements 2t,
// 2t + 1 (lo) and 2t + 8, 2t + 9 (hi) as scaled bf16 pairs, from the row's 8 code bytes q.
// b_sel = (t << 4) | ((4 + t) << 12) puts byte t of each half at bytes 1 and 3: nibbles 3 and 7
// are then elements 2t + 1, 2t + 9; shifted by 4, elements 2t, 2t + 8 (fp4_e2m1_pair_bf16).
// PERM: the step's k order is gemm_kperm's, where the decode's own pairs (2t, 2t + 8) and
// (2t + 1, 2t + 9) are the fragment's (2t, 2t + 1) and (2t + 8, 2t + 9): no pairing permutes.
template <bool PERM = false>
__device__ __forceinline__ void fp4_frag16(uint2 q, u32 s2, u32 b_sel, u32& lo, u32& hi) {
    const u32 v = __byte_perm(q.x, q.y, b_sel);
    const u32 odd = bf16x2_mul(fp4_e2m1_pair_bf16(v), s2);
    const u32 even = bf16x2_mul(fp4_e2m1_pair_bf16(v << 4), s2);
    if (PERM) {
        lo = even;
        hi = odd;
    } else {
        lo = __byte_perm(even, odd, 0x5410);
        hi = __byte_perm(even, odd, 0x7632);
    }
}

// The permuted k order of the grouped MoE's wgmma GEMMs: within every 16 columns, column p is
// stored at gemm_kperm(p), which swaps 2t + 1 and 2t + 8 (t < 4), an involution. The weights
// keep their layout (fp4_frag16<true> decodes straight into it); the activations are written
// in it by gather_rows_bf16 (moe.cu) and by the gated epilogue, for the down product.
__device__ __forceinline__ int gemm_kperm(int p) {
    const int i = p & 15;
    return ((i ^ (i >> 3)) & 1) ? (p & ~15) | (i < 8 ? i + 7 : i - 7) : p;
}

// Epilogue: whether output row m is written, and its factor (the router weight, fused into the
// down projection).
__device__ __forceinline__ bool gemm_out_row(const GemmArgs& g, int m, int m_total, float& rs) {
    rs = 1.0f;
    if (m >= m_total) return false;
    if (g.row_scale) {
        int idx = m;
        if (g.row_scale_map) {
            idx = g.row_scale_map[m];
            if (idx < 0) return false;
        }
        rs = g.row_scale[idx];
    }
    return true;
}
// The epilogue's factors, gathered into shared memory before the k loop: per local weight row
// (B row) its tensor scale and 2^s_off (row_tscale; 0 for rows past the output), per tile row
// its factor and whether it is written (gemm_out_row). Looked up in the epilogue itself, every
// factor was a global load behind the stores before it (the compiler cannot tell them apart),
// so a thread's epilogue was one long chain of dependent loads: on the H200 the wgmma kernel's
// blocks spent ~25 us there against ~0.25 us per k-tile (twenty-fourth session).
template <int ROWS, int BM>
struct GemmEpi {
    float ts[ROWS];
    float rs[BM];
    u8 ok[BM];
};
// Fills `e` with `threads` threads numbered `t`; `w_row(r)` is local weight row r's weight row.
template <int ROWS, int BM, typename F>
__device__ __forceinline__ void gemm_epi_fill(GemmEpi<ROWS, BM>* e, const GemmArgs& g, const W& w, int m0, int m_total,
                                              int t, int threads, F w_row) {
    for (int r = t; r < ROWS; r += threads) {
        const int wr = w_row(r);
        e->ts[r] = wr >= 0 ? row_tscale(w, wr) : 0.0f;
    }
    for (int i = t; i < BM; i += threads) {
        float rs;
        e->ok[i] = gemm_out_row(g, m0 + i, m_total, rs);
        e->rs[i] = rs;
    }
}
// Output (m, n) of a plain product: the accumulator times its weight row's and its row's factors.
__device__ __forceinline__ void gemm_store(const GemmArgs& g, size_t out_z, int m, int n, float acc, float ts,
                                           float rs) {
    if (n >= g.n) return;
    g.out[out_z + (size_t)m * g.out_stride + n] = acc * ts * rs;
}
// Output (m, j) of the gated product, SiLU(gate) * up, as bf16 (and its residual term).
// Output j is stored at column `col` (j itself, or gemm_kperm(j) for a permuted-k consumer).
__device__ __forceinline__ void gemm_store_gated(const GemmArgs& g, size_t out_z, int m, int j, int col, float gate,
                                                 float up, float rs) {
    if (j >= g.n) return;
    float v = silu_f(gate) * up * rs;
    u16 hi = f32_to_bf16(v);
    g.out_bf16[out_z + (size_t)m * g.out_stride + col] = hi;
    if (g.out_bf16_lo) g.out_bf16_lo[out_z + (size_t)m * g.out_stride + col] = f32_to_bf16(v - bf16_to_f32(hi));
}

template <int BM, int BN, int TERMS, int KIND>
__device__ void gemm_fp4_body_k(W w, GemmArgs g, u8* smem) {
    w.kind = KIND; // gemm_fp4_body's dispatch: every kind test below folds
    typedef GemmSmem<BM, BN, TERMS> L;
    const int STAGES = L::STAGES;
    const int WC = BN / GEMM_WARPS;            // columns per warp
    const int MT = BM / 16, NS = WC / 8;       // m16 tiles and n8 tiles per warp
    const int tid = threadIdx.x, lane = tid & 31, wn = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const GemmTile tile = gemm_tile(g, BM);
    if (tile.m0 >= tile.m_total) return;
    const int m0 = tile.m0, m_total = tile.m_total, expert_row0 = tile.expert_row0;
    const size_t out_z = tile.out_z;
    const int kt_count = w.kp / GEMM_BK;
    const int cb = w.kp / 2;

    Fp4Lut* lut = (Fp4Lut*)(smem + STAGES * L::STAGE);
    lut_init(lut, w);

    // Fixed per-thread copy assignments: A chunks, code chunks (a row's 32 bytes are two
    // chunks), one scale word per B row.
    const int ACH = BM * 8 / GEMM_THREADS, BCH = BN * 2 / GEMM_THREADS;
    long long a_off[ACH];
    gemm_a_offsets(g, m0, m_total, a_off);
    int b_src_row[BCH];
#pragma unroll
    for (int j = 0; j < BCH; j++) b_src_row[j] = b_row<BN>(g, (tid + GEMM_THREADS * j) / 2, expert_row0);
    const int s_row = tid < BN ? b_row<BN>(g, tid, expert_row0) : -1;
    typedef GemmEpi<BN, BM> Epi;
    static_assert(sizeof(Epi) <= L::EPI, "GemmSmem::EPI holds GemmEpi");
    Epi* epi = (Epi*)(smem + STAGES * L::STAGE + sizeof(Fp4Lut));
    // Read after the k loop's barriers.
    gemm_epi_fill(epi, g, w, m0, m_total, tid, GEMM_THREADS, [&](int r) { return b_row<BN>(g, r, expert_row0); });

    auto load_stage = [&](int st, int kt) {
        u8* base = smem + st * L::STAGE;
        u16* sa = (u16*)base;
        u8* sb = base + L::A_BYTES;
        u8* ss = sb + L::B_BYTES;
        gemm_load_a<BM, TERMS>(g, a_off, sa, kt);
#pragma unroll
        for (int j = 0; j < BCH; j++) {
            int ch = tid + GEMM_THREADS * j;
            int row = ch / 2, c = ch % 2;
            int wr = b_src_row[j];
            void* dst = sb + gemm_code_off(row, c);
            const u8* src = wr >= 0 ? w.codes + (size_t)wr * cb + kt * (GEMM_BK / 2) + c * 16 : w.codes;
            cp_async16(dst, src, wr >= 0);
        }
        if (tid < BN) {
            const u8* src = s_row >= 0 ? w.scales + gemm_scale_src(w, s_row, kt) : w.scales;
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
        auto scale_of = [&](u32 word, int ks) { return scale_pair(lut, w, gemm_scale_code(w, word, kt, ks)); };
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
                fp4_frag16(q, SPT > 1 ? sp[s][ks % SPT] : scale_of(sw[s], ks), b_sel, bf[s][0], bf[s][1]);
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

    // Epilogue: local B row r0 + s * 8 + c holds output column blockIdx.x * BN + r0 + s * 8 + c;
    // gated, gate rows of outputs j0 + s * 8 + c, and their up rows WC / 2 further.
    const int r0 = wn * WC + tq * 2, n0 = blockIdx.x * BN + r0, j0 = blockIdx.x * (BN / 2) + wn * (WC / 2) + tq * 2;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hrow = 0; hrow < 2; hrow++) {
            const int i = mt * 16 + gq + hrow * 8, m = m0 + i;
            if (!epi->ok[i]) continue;
            const float rs = epi->rs[i];
            if (!g.gated) {
#pragma unroll
                for (int s = 0; s < NS; s++)
#pragma unroll
                    for (int c = 0; c < 2; c++)
                        gemm_store(g, out_z, m, n0 + s * 8 + c, acc[mt][s][hrow * 2 + c], epi->ts[r0 + s * 8 + c], rs);
            } else {
#pragma unroll
                for (int s = 0; s < NS / 2; s++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int rg = r0 + s * 8 + c;
                        gemm_store_gated(g, out_z, m, j0 + s * 8 + c, j0 + s * 8 + c, acc[mt][s][hrow * 2 + c] * epi->ts[rg],
                                         acc[mt][s + NS / 2][hrow * 2 + c] * epi->ts[rg + WC / 2], rs);
                    }
            }
        }
    }
}

// One copy of the kernel body per weight kind: with the kind a runtime value, the scale code
// of both kinds (E8M0 computed, E4M3 from the shared table) ran in the k loop side by side.
template <int BM, int BN, int TERMS>
__device__ void gemm_fp4_body(const W& w, const GemmArgs& g, u8* smem) {
    if (w.kind == KIND_NVFP4) gemm_fp4_body_k<BM, BN, TERMS, KIND_NVFP4>(w, g, smem);
    else gemm_fp4_body_k<BM, BN, TERMS, KIND_MXFP4>(w, g, smem);
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

// ---- The same product on Hopper's warpgroup MMA (`wgmma`, sm_90a) ------------------------------
// mma.sync tops out well below the tensor cores' rate on the H100: the kernel above spends ~10
// instructions per mma and its tensor pipe sat at 36 % (seventh session). Here the roles turn
// around, so the weights never pass through shared memory decoded: y^T = W . A^T, with
// - the weights as wgmma's A operand *from registers*: each consumer warpgroup owns 64 weight
//   rows (a block 128: WR_ROWS), and each warp decodes its 16 rows' fragments for a 16-column
//   step from the raw codes in shared memory exactly as the mma.sync kernel decodes its B
//   fragments (fp4_frag16: the m16n8k16 A layout is two such rows);
// - the activations as the B operand from shared memory: BM tokens x GEMM_BK columns, copied
//   by cp.async in gemm_load_a's layout (16-byte chunk c of row r at c ^ (r & 7), 128-byte
//   rows), which is wgmma's 128-byte swizzle when the tile starts 1024-byte aligned;
// - m64nBMk16 per step and term, accumulators in registers: register 4 s + i holds weight row
//   16 wq + gq (+ 8 for i >= 2) of the warpgroup's 64, token 8 s + 2 tq + (i & 1);
// - warp-specialized: a producer warpgroup only copies and hands each stage to the two consumer
//   warpgroups through a "full" mbarrier; the consumers hand it back through an "empty"
//   mbarrier once the wgmma that read it has finished. No block-wide barrier in the k loop.
//   The activation tiles come by TMA (one bulk tensor copy per term and stage, in the 128-byte
//   swizzle, counted on the full barrier as transaction bytes), the weight codes and scales by
//   the producers' cp.async (arriving on the same barrier: cp.async.mbarrier.arrive.noinc).
//   TMA cannot gather rows, so the grouped MoE's gate/up first writes its tokens in expert
//   order (gather_rows_bf16); its down product reads the intermediate, already in that order.
//   On the H200 (twenty-fourth session) the TMA copies took a Qwen3 MoE layer at 8192 tokens
//   from 4.71 to 4.32 ms, and the epilogue's factors in shared memory (GemmEpi) to 2.87 ms;
//   clusters of two blocks sharing their activation tiles by multicast measured slower;
// - wgmma runs asynchronously: a consumer decodes k-tile kt + 1 (into the other of two fragment
//   sets) while tile kt's products run, and waits only for tile kt - 1's, then releases its
//   stage;
// - persistent: one block per SM walks the output tiles (gridDim.x apart), its k-tiles numbered
//   across them, so the producer copies the next tile's first stages while the consumers finish
//   this one, and the set-up (scale table, barriers) is paid once per SM. The producers also
//   fill the epilogue's factors for each tile. On the H200 this made the MoE's 64-row tiles
//   12 % faster and its 128-row ones 2-4 % (twenty-fifth session): the k loop, not the
//   per-block cost, is what is slow.
// Gated (MoE gate/up) blocks put in each warp's 16 rows 8 gate rows, then the 8 up rows of the
// same outputs, so a thread holds both factors of its outputs (rows g and g + 8).
// A first version that decoded the weights into a bf16 tile in shared memory for wgmma to read
// ran no faster than mma.sync.
#define WR_ROWS 128 // weight rows per block: WG_ROWS per consumer warpgroup
#define WG_ROWS (WR_ROWS / 2)
#define HALVES (WG_ROWS / 64) // m64 wgmma row blocks per consumer warpgroup
#define WS_PRODUCERS 128 // copy threads: one warpgroup
#define WS_THREADS (WS_PRODUCERS + 2 * 128)
// Registers per thread after `setmaxnreg`: the launch gives every thread 65536 / WS_THREADS
// (168); the producers need few, and the consumers of 256-token tiles hold 128 accumulators
// beside two k-tiles of fragments (ptxas: 194 registers, no spills). 56 * 128 + 224 * 256 =
// 168 * 384. On the H200 (twenty-seventh session) this alone made the 128-row kernels 3-4 %
// faster (a Qwen3 MoE layer at 2048 tokens 0.887 -> 0.860 ms, bf16 x).
#define WS_PRODUCER_REGS 56
#define WS_CONSUMER_REGS 224
#define WG_MAX_STAGES 8
#define WG_SMEM_MAX (227 * 1024) // one block per SM

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_OK 1
#endif

// Shared-memory matrix descriptor of a K-major bf16 tile with 128-byte rows and the 128-byte
// swizzle: start address, leading offset (unused by this layout: 1), stride 1024 bytes between
// groups of 8 rows, swizzle mode 1 in bits 62-63. A k step of 16 columns is 32 bytes further.
__device__ __forceinline__ u64 wg_desc(const void* p) {
    const u64 a = smem_u32(p);
    return ((a & 0x3FFFF) >> 4) | (1ull << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wg_fence() {
#ifdef WGMMA_OK
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
// Hands registers back to (dec) or takes them from (inc) the block's pool, for the whole
// warpgroup. Without them ptxas caps every thread at the launch's share and spills or
// serializes the wgmma of the taller tiles.
template <int R>
__device__ __forceinline__ void wg_setmaxnreg_dec() {
#ifdef WGMMA_OK
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
#endif
}
template <int R>
__device__ __forceinline__ void wg_setmaxnreg_inc() {
#ifdef WGMMA_OK
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef WGMMA_OK
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifdef WGMMA_OK
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving other instructions that define the accumulators into the
// span where wgmma owns them (ptxas would then serialize the wgmma: warning C7515).
template <int N>
__device__ __forceinline__ void wg_fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// D (m64nNk16, f32) += A (registers: this thread's 4 bf16 pairs) . B (shared, descriptor), with
// the accumulators as N / 2 "+f" operands.
#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_D32(i) WG_D8(i), WG_D8(i + 8), WG_D8(i + 16), WG_D8(i + 24)
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const u32 (&a)[4], u64 desc_b) {
#ifdef WGMMA_OK
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}"
        : WG_D32(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#endif
}

__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const u32 (&a)[4], u64 desc_b) {
#ifdef WGMMA_OK
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}"
        : WG_D32(0), WG_D32(32)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#endif
}

// N = 192 or 256: the first 128 tokens, then the rest from B's row 128 on (128-byte rows, so
// 16 KB further: the descriptor's address field is bytes / 16 and never carries, as in the k
// loop). Two m64n128k16 instructions run as fast as one m64n256k16 would, and spare a second
// 134-operand asm block.
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 desc_b) {
    static_assert(N % 64 == 0 && N <= 256, "tokens per tile: 64, 128, 192 or 256");
    if constexpr (N == 64) wgmma_rs_n64(d, a, desc_b);
    else if constexpr (N == 128) wgmma_rs_n128(d, a, desc_b);
    else {
        wgmma_rs_n128(*(float(*)[64])d, a, desc_b);
        wgmma_rs<N - 128>(*(float(*)[(N - 128) / 2])(d + 64), a, desc_b + (128 * 128 / 16));
    }
}

// Shared memory of gemm_fp4_wg (after aligning the base to 1024 bytes): the NVFP4 scale table,
// the mbarriers (the stages' full, then empty, then the epilogue factors' full and empty), the
// epilogue's factors, then STAGES x (activation
// tiles, code tile, scale tile; rounded to 1024 bytes), as many stages as fit (at most
// WG_MAX_STAGES). The host's gemm_wg_smem (src/backend.rs) computes the same.
template <int BM, int TERMS>
struct WgSmem {
    static const int A_TERM = BM * GEMM_BK * 2;
    static const int A_BYTES = A_TERM * TERMS;
    static const int C_BYTES = WR_ROWS * GEMM_BK / 2;
    static const int STAGE = (A_BYTES + C_BYTES + WR_ROWS * GEMM_SCALE_BYTES + 1023) / 1024 * 1024;
    static const int FIXED = 1024 + 1024 + 1024 + 2048; // alignment slack, Fp4Lut, mbarriers, GemmEpi
    static const int FIT = (WG_SMEM_MAX - FIXED) / STAGE;
    static const int STAGES = FIT < WG_MAX_STAGES ? FIT : WG_MAX_STAGES;
    static const int TOTAL = FIXED + STAGES * STAGE;
};

// Weight row of local row r (0..WR_ROWS) of weight-row block bx, or -1 (zero fill). Gated: 16-row warp slice q holds
// gate rows of outputs 8 q .. 8 q + 7 of the block, then their up rows.
__device__ __forceinline__ int wg_w_row(const GemmArgs& g, int bx, int r, int expert_row0) {
    if (!g.gated) {
        int n = bx * WR_ROWS + r;
        return n < g.n ? expert_row0 + n : -1;
    }
    int j = bx * (WR_ROWS / 2) + (r >> 4) * 8 + (r & 7);
    if (j >= g.n) return -1;
    return expert_row0 + ((r & 8) ? g.n + j : j);
}

// Shared-memory mbarriers (one phase per use of a stage). Only the wgmma kernel uses them, so
// they compile to nothing where it cannot run.
__device__ __forceinline__ void mbar_init(u64* b, u32 count) {
#ifdef WGMMA_OK
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(u64* b) {
#ifdef WGMMA_OK
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
#endif
}
// Arrives once every cp.async this thread has issued so far has landed (the barrier's count
// includes this arrival: noinc).
__device__ __forceinline__ void mbar_arrive_copies(u64* b) {
#ifdef WGMMA_OK
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(b)) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(u64* b, u32 parity) {
#ifdef WGMMA_OK
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
#endif
}
// The activation terms' TMA descriptors (CUtensorMap, 128 bytes each, made by the host's
// gemm_tma_maps): 3D views {columns (kp), batch slices, rows} of each bf16 term, boxes of
// {GEMM_BK, 1, BM} in the 128-byte swizzle; the grouped MoE's (TERMS <= 2) also boxes of BM / 2
// rows from t[TMA_HALF] on, for its half-height tiles. A kernel parameter, so `&t[i]` is the
// descriptor's address as TMA wants it (__grid_constant__).
struct alignas(64) TmaMap {
    u64 v[16];
};
#define TMA_HALF 2
struct alignas(64) TmaA {
    TmaMap t[4];
};
__device__ __forceinline__ void mbar_expect_tx(u64* b, u32 bytes) {
#ifdef WGMMA_OK
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
#endif
}
// Box {c0, c1, c2} of `map` into shared `dst`, completing `bytes` on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaMap* map, int c0, int c1, int c2, u64* bar) {
#ifdef WGMMA_OK
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
            smem_u32(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
#endif
}

// One k-tile's products of a consumer warpgroup: per 16-column step, term and m64 half, the
// first NT tokens of acc[h] += A fragments . B (the activation tile whose descriptor's low word is
// dlo, terms a_term bytes apart).
template <int NT, int BM, int TERMS>
__device__ __forceinline__ void wg_products(float (&acc)[HALVES][BM / 2], u32 (&af)[HALVES][GEMM_BK / 16][4], u32 dlo,
                                            u32 dhi, int a_term) {
    wg_fence();
    // The descriptor's address field (bits 0-13, address / 16) never carries into bit 16 or
    // beyond (shared memory ends below 256 KB): each step's is a 32-bit add to the low word.
    auto db_at = [&](int off) { return ((u64)dhi << 32) | (u64)(dlo + (u32)(off >> 4)); };
#pragma unroll
    for (int ks = 0; ks < GEMM_BK / 16; ks++)
#pragma unroll
        for (int tm = 0; tm < TERMS; tm++)
#pragma unroll
            for (int h = 0; h < HALVES; h++)
                wgmma_rs<NT>(*(float(*)[NT / 2])acc[h], af[h][ks], db_at(tm * a_term + ks * 32));
    wg_commit();
}

template <int BM, int TERMS, int KIND, bool PERM>
__device__ void gemm_fp4_wg_body_k(W w, GemmArgs g, const TmaA& ta, u8* smem_raw) {
    w.kind = KIND; // as gemm_fp4_body_k
    typedef WgSmem<BM, TERMS> L;
    const int STAGES = L::STAGES;
    static_assert(STAGES >= 2, "shared memory for at least two stages");
    const int tid = threadIdx.x;
    // The tiles, walked by every block in steps of gridDim.x (x fastest: the blocks in flight
    // share their activation tiles in L2): gx weight-row blocks x the valid row tiles x slices.
    const int m_total = gemm_m_total(g);
    const int gx = g.gated ? (g.n + WR_ROWS / 2 - 1) / (WR_ROWS / 2) : (g.n + WR_ROWS - 1) / WR_ROWS;
    const int gy = g.tile_m0 ? *g.tile_count : (m_total + BM - 1) / BM;
    const int tiles = gx * gy * (g.slices > 0 ? g.slices : 1);
    // The end of row tile by (its rows past it are another tile's or padding).
    auto tile_end = [&](int by, int m0) { return g.tile_m0 ? g.tile_m0[by + 1] : min(m0 + BM, m_total); };
    // Whether row tile by holds HALF_BM rows only (moe_scan's mixed tiles): its activations come
    // in boxes that tall, and its products cover that many tokens (the rest of its accumulators
    // stay zero and its epilogue rows are not written). The grouped MoE's 128-row kernels only
    // (PERM), so the linears' compile as before.
    constexpr int HALF_BM = BM == 128 && PERM ? BM / 2 : BM;
    static_assert(HALF_BM == BM || TERMS <= TMA_HALF, "half-height boxes follow the terms' in TmaA");
    auto tile_half = [&](int by, int m0) { return HALF_BM < BM && g.tile_m0 && g.tile_m0[by + 1] - m0 <= HALF_BM; };
    const int kt_count = w.kp / GEMM_BK; // even: kp is a multiple of FP4_KP_ALIGN (128)
    // Aligned by an offset from the shared pointer itself, so the compiler keeps shared accesses.
    u8* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    Fp4Lut* lut = (Fp4Lut*)smem;
    u64* full = (u64*)(smem + 1024);
    u64* empty = full + STAGES;
    u64* epi_full = empty + STAGES;
    u64* epi_empty = epi_full + 1;
    typedef GemmEpi<WR_ROWS, BM> Epi;
    static_assert(sizeof(Epi) <= 2048, "WgSmem::FIXED holds GemmEpi");
    Epi* epi = (Epi*)(smem + 2048);
    u8* stages = smem + 4096;
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], WS_PRODUCERS + 1); // + thread 0's expect_tx
            mbar_init(&empty[s], WS_THREADS - WS_PRODUCERS);
        }
        mbar_init(epi_full, WS_PRODUCERS);
        mbar_init(epi_empty, WS_THREADS - WS_PRODUCERS);
    }
    lut_init(lut, w); // ends in __syncthreads: the barriers are initialized for every thread

    if (tid < WS_PRODUCERS) {
        wg_setmaxnreg_dec<WS_PRODUCER_REGS>();
        // Producer: k-tile it into stage it % STAGES once the consumers have released the
        // k-tile STAGES before it, tile after tile, so the next tile's first stages are copied
        // while the consumers finish this one. Thread 0 requests the activation tiles by TMA;
        // every thread copies CCH 16-byte code chunks (row (tid + 128 j) / 2, half tid % 2) and
        // SCH scale words (row tid + 128 j). The producers also fill the epilogue's factors
        // (one buffer): once the consumers have released the previous tile's, after the first
        // stages of this tile are requested, so that wait and its loads overlap the math.
        const int CCH = WR_ROWS * 2 / WS_PRODUCERS, SCH = WR_ROWS / WS_PRODUCERS;
        int it = 0;
        for (int t = blockIdx.x, ti = 0; t < tiles; t += gridDim.x, ti++) {
            const int bx = t % gx, by = (t / gx) % gy, bz = t / gx / gy;
            const GemmTile tile = gemm_tile_at(g, BM, m_total, by, bz);
            const u8* c_src[CCH];
#pragma unroll
            for (int j = 0; j < CCH; j++) {
                const int wr = wg_w_row(g, bx, (tid + WS_PRODUCERS * j) >> 1, tile.expert_row0);
                c_src[j] = wr >= 0 ? w.codes + (size_t)wr * (w.kp / 2) + (tid & 1) * 16 : nullptr;
            }
            int s_row[SCH];
#pragma unroll
            for (int j = 0; j < SCH; j++) s_row[j] = wg_w_row(g, bx, tid + WS_PRODUCERS * j, tile.expert_row0);
            const int fill_at = (kt_count < STAGES ? kt_count : STAGES) - 1;
            const bool half = tile_half(by, tile.m0);
            for (int kt = 0; kt < kt_count; kt++, it++) {
                const int st = it % STAGES;
                if (it >= STAGES) mbar_wait(&empty[st], ((it / STAGES) - 1) & 1);
                u8* base = stages + st * L::STAGE;
                if (tid == 0) {
                    mbar_expect_tx(&full[st], half ? L::A_BYTES / 2 : L::A_BYTES);
#pragma unroll
                    for (int tt = 0; tt < TERMS; tt++)
                        tma_load_3d(base + tt * L::A_TERM, &ta.t[half ? TMA_HALF + tt : tt], kt * GEMM_BK, bz, tile.m0,
                                    &full[st]);
                }
                u8* sc = base + L::A_BYTES;
#pragma unroll
                for (int j = 0; j < CCH; j++)
                    cp_async16(sc + gemm_code_off((tid + WS_PRODUCERS * j) >> 1, tid & 1),
                               c_src[j] ? c_src[j] + kt * (GEMM_BK / 2) : w.codes, c_src[j] != nullptr);
#pragma unroll
                for (int j = 0; j < SCH; j++) {
                    const bool ok = s_row[j] >= 0;
                    cp_async4(sc + L::C_BYTES + (tid + WS_PRODUCERS * j) * GEMM_SCALE_BYTES,
                              ok ? w.scales + gemm_scale_src(w, s_row[j], kt) : w.scales, ok);
                }
                mbar_arrive_copies(&full[st]);
                if (kt == fill_at) {
                    if (ti > 0) mbar_wait(epi_empty, (ti - 1) & 1);
                    gemm_epi_fill(epi, g, w, tile.m0, tile_end(by, tile.m0), tid, WS_PRODUCERS,
                                  [&](int rr) { return wg_w_row(g, bx, rr, tile.expert_row0); });
                    mbar_arrive(epi_full);
                }
            }
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }

    // Consumers: warpgroup wg (0, 1) of the two owns weight rows wg * WG_ROWS .. + WG_ROWS, in
    // HALVES m64 halves; warp wq of its four.
    wg_setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int ct = tid - WS_PRODUCERS, lane = ct & 31, wg = ct >> 7, wq = (ct >> 5) & 3;
    const int gq = lane >> 2, tq = lane & 3;
    // This thread's fragment rows in half h: r + 64 h and r + 64 h + 8 of the block's WR_ROWS
    // (the same gemm_code_off swap, as (r + 8) >> 2 has the parity of r >> 2).
    const int r = wg * WG_ROWS + wq * 16 + gq;
    const u32 b_sel = (tq << 4) | ((4 + tq) << 12);
    // A fragments of one k-tile: per half, 4 steps of m64k16, registers (row r, k 2t..),
    // (r + 8, 2t..), (r, 2t + 8..), (r + 8, 2t + 8..).
    auto decode_tile = [&](const u8* sc, int kt, u32(&af)[HALVES][GEMM_BK / 16][4]) {
        const u32* ss = (const u32*)(sc + L::C_BYTES);
#pragma unroll
        for (int h = 0; h < HALVES; h++) {
            const int rh = r + 64 * h;
            const u32 w0 = ss[rh], w1 = ss[rh + 8];
#pragma unroll
            for (int ks = 0; ks < GEMM_BK / 16; ks++) {
                const u8* p = sc + gemm_code_off(rh, ks >> 1) + (ks & 1) * 8;
                const uint2 q0 = *(const uint2*)p, q1 = *(const uint2*)(p + 8 * (GEMM_BK / 2));
                fp4_frag16<PERM>(q0, scale_pair(lut, w, gemm_scale_code(w, w0, kt, ks)), b_sel, af[h][ks][0], af[h][ks][2]);
                fp4_frag16<PERM>(q1, scale_pair(lut, w, gemm_scale_code(w, w1, kt, ks)), b_sel, af[h][ks][1], af[h][ks][3]);
            }
        }
    };

    float acc[HALVES][BM / 2];
    auto fence_acc = [&]() {
#pragma unroll
        for (int h = 0; h < HALVES; h++) wg_fence_operands(acc[h]);
    };

    // k-tile kt of the tile, the block's k-tile number it. `half` (tile_half) is tested in each
    // k step: with a k loop per height instead, ptxas serialized every wgmma of the kernel.
    auto step = [&](bool half, int it, int kt, u32(&af)[HALVES][GEMM_BK / 16][4]) {
        const int st = it % STAGES;
        mbar_wait(&full[st], (it / STAGES) & 1);
        const u8* base = stages + st * L::STAGE;
        decode_tile(base + L::A_BYTES, kt, af);
        fence_acc();
        const u64 db = wg_desc(base);
        const u32 dlo = (u32)db, dhi = (u32)(db >> 32);
        if (HALF_BM < BM && half) wg_products<HALF_BM, BM, TERMS>(acc, af, dlo, dhi, L::A_TERM);
        else wg_products<BM, BM, TERMS>(acc, af, dlo, dhi, L::A_TERM);
        // k-tile kt - 1's products have finished: its stage goes back to the producer (its
        // codes were read by the decode before them).
        wg_wait<1>();
        fence_acc();
        if (kt > 0) mbar_arrive(&empty[(it - 1) % STAGES]);
    };
    u32 af0[HALVES][GEMM_BK / 16][4], af1[HALVES][GEMM_BK / 16][4];
    int it = 0;
    for (int t = blockIdx.x, ti = 0; t < tiles; t += gridDim.x, ti++) {
        const int bx = t % gx, by = (t / gx) % gy, bz = t / gx / gy;
        const int m0 = g.tile_m0 ? g.tile_m0[by] : by * BM;
        const size_t out_z = (size_t)bz * g.out_z;
#pragma unroll
        for (int h = 0; h < HALVES; h++)
#pragma unroll
            for (int j = 0; j < BM / 2; j++) acc[h][j] = 0.0f;
        const bool half = tile_half(by, m0);
        // Two k-tiles per trip, so each fragment set is a fixed set of registers. A do-while
        // leaves no zero-trip path joining the wgmma pipeline (ptxas then serialized every
        // wgmma: C7515).
        int kt = 0;
        do {
            step(half, it + kt, kt, af0);
            step(half, it + kt + 1, kt + 1, af1);
            kt += 2;
        } while (kt < kt_count);
        wg_wait<0>();
        fence_acc();
        it += kt_count;
        mbar_arrive(&empty[(it - 1) % STAGES]); // the tile's last stage
        mbar_wait(epi_full, ti & 1);

        // Epilogue: token m0 + 8 s + 2 tq + c, weight row r + 64 h (+ 8): acc[h][4 s + c]
        // (acc[h][4 s + 2 + c]). Gated, row r + 64 h holds the gate of output j, row + 8 its up.
#pragma unroll
        for (int h = 0; h < HALVES; h++) {
            const int rh = r + 64 * h;
            const int n0 = bx * WR_ROWS + rh, j = bx * (WR_ROWS / 2) + (rh >> 4) * 8 + gq;
#pragma unroll
            for (int s = 0; s < BM / 8; s++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int i = s * 8 + tq * 2 + c, m = m0 + i;
                    if (!epi->ok[i]) continue;
                    const float rs = epi->rs[i];
                    if (!g.gated) {
                        gemm_store(g, out_z, m, n0, acc[h][s * 4 + c], epi->ts[rh], rs);
                        gemm_store(g, out_z, m, n0 + 8, acc[h][s * 4 + 2 + c], epi->ts[rh + 8], rs);
                    } else {
                        gemm_store_gated(g, out_z, m, j, PERM ? gemm_kperm(j) : j, acc[h][s * 4 + c] * epi->ts[rh],
                                         acc[h][s * 4 + 2 + c] * epi->ts[rh + 8], rs);
                    }
                }
        }
        mbar_arrive(epi_empty);
    }
}

template <int BM, int TERMS, bool PERM>
__device__ void gemm_fp4_wg_body(const W& w, const GemmArgs& g, const TmaA& ta, u8* smem_raw) {
    if (w.kind == KIND_NVFP4) gemm_fp4_wg_body_k<BM, TERMS, KIND_NVFP4, PERM>(w, g, ta, smem_raw);
    else gemm_fp4_wg_body_k<BM, TERMS, KIND_MXFP4, PERM>(w, g, ta, smem_raw);
}

// gemm_fp4_wg_t{TERMS}_m{BM}: tiles of BM tokens x WR_ROWS weight rows, one persistent block of
// WS_THREADS per SM (the host launches min(tiles, SMs) blocks along x). `_kperm`: the grouped
// MoE's, activations in gemm_kperm's column order (and a gated output written in it).
// The activations come through `ta` only (g.a, g.a_map and g.a_stride are not read).
#define GEMM_FP4_WG(BM, TERMS, PERM, SUFFIX)                                                                     \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)                                                  \
        gemm_fp4_wg_t##TERMS##_m##BM##SUFFIX(W w, GemmArgs g, const __grid_constant__ TmaA ta) {                 \
        extern __shared__ __align__(16) u8 smem[];                                                               \
        pdl_enter();                                                                                             \
        gemm_fp4_wg_body<BM, TERMS, PERM>(w, g, ta, smem);                                                       \
    }
#define GEMM_FP4_WG_TERMS(BM)                                                                                    \
    GEMM_FP4_WG(BM, 1, false, ) GEMM_FP4_WG(BM, 2, false, ) GEMM_FP4_WG(BM, 3, false, )                          \
    GEMM_FP4_WG(BM, 1, true, _kperm) GEMM_FP4_WG(BM, 2, true, _kperm)
GEMM_FP4_WG_TERMS(64)
GEMM_FP4_WG_TERMS(128)
// 256-row tiles for long prefills of dense linears with bf16 x (three terms would leave two
// stages). The grouped MoE stays at 128: each expert's rows are padded to whole tiles, and on
// the H200 (twenty-seventh session) 192-row MoE tiles, 6-9 % faster on a layer whose 2048
// tokens were spread evenly, made both synthetic models' prefill slower (uneven routing).
GEMM_FP4_WG(256, 1, false, )

// f32 weights on the tensor cores (3xTF32, common.cuh): dense linears (routers) and MLA's
// per-head products, batched over H slices. Slice h of y [M, H, J] = x [M, H, I] . A_h, with
// w_h = w + h * w_rows * cols an f32 [w_rows, cols] matrix and
//   T false: A_h(i, j) = w_h[j, i]  (J = w_rows, I = cols): a linear, y = x . w_hᵀ
//   T true:  A_h(i, j) = w_h[i, j]  (I = w_rows, J = cols): MLA's W_UKᵀ (sums across the rows).
// Each warp owns 16 rows x COLS columns; x and the weights are split when the fragments are read.
// grid (ceil(J / COLS), ceil(M / FT_ROWS), H), block 128; or, with k_chunk > 0 (H = 1), grid.z
// splits of the reduction, k_chunk long each, slice z writing its partial sums to y + z * M * J
// (sum_splits_f32 adds them in order): a router's 64-128 columns give only 64-128 blocks, and
// each walked all 2048 inputs. Weights of other kinds are decoded to
// f32 first (decode_head_rows): decoding FP4 inside the product, once per element and block,
// was the whole cost of GLM's W_UK product (0.9 ms per call at 2048 tokens on the CUDA cores or
// the tensor cores alike). Replaces an f32 SIMT GEMM (routers: 0.15 ms per Qwen3 call at 2048).
#define FT_ROWS 64 // rows per block: 4 warps of 16
#define FT_K 32    // reduction step per stage (4 mma k-steps)

template <int COLS, bool T>
__device__ __forceinline__ void gemm_f32_tc_body(const float* w, const float* x, float* y, int m_rows, int heads,
                                                 int w_rows, int cols, int k_chunk) {
    pdl_enter();
    // Row strides of 40 floats (8 mod 32): a half warp's 8-byte fragment reads (rows g, dims
    // 2t, 2t + 1) fall on distinct banks.
    __shared__ float xs[FT_ROWS][FT_K + 8];
    __shared__ float ws[COLS][FT_K + 8];
    const int m0 = blockIdx.y * FT_ROWS, j0 = blockIdx.x * COLS;
    const int ni = T ? w_rows : cols, nj = T ? cols : w_rows;
    const int h = k_chunk ? 0 : blockIdx.z;
    const int ib = k_chunk ? blockIdx.z * k_chunk : 0, ie = k_chunk ? min(ni, ib + k_chunk) : ni;
    if (k_chunk) y += (size_t)blockIdx.z * m_rows * nj;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const float* wh = w + (size_t)h * w_rows * cols;
    float acc[COLS / 8][4];
#pragma unroll
    for (int nt = 0; nt < COLS / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.0f;
    constexpr int XN = FT_ROWS * FT_K / 128, WN = FT_K * COLS / 128;
    for (int i0 = ib; i0 < ie; i0 += FT_K) {
        // Every load of the step in flight before the stores.
        float xv[XN], wv[WN];
#pragma unroll
        for (int u = 0; u < XN; u++) {
            int e = tid + 128 * u, m = m0 + e / FT_K, i = i0 + e % FT_K;
            xv[u] = m < m_rows && i < ie ? x[((size_t)m * heads + h) * ni + i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < WN; u++) {
            // Consecutive threads walk w's rows: j when transposed, i otherwise.
            int e = tid + 128 * u;
            int i = i0 + (T ? e / COLS : e % FT_K), j = j0 + (T ? e % COLS : e / FT_K);
            wv[u] = i < ie && j < nj ? (T ? wh[(size_t)i * cols + j] : wh[(size_t)j * cols + i]) : 0.0f;
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
        NAME(const float* w, const float* x, float* y, int m_rows, int heads, int w_rows, int cols, int k_chunk) { \
        gemm_f32_tc_body<COLS, T>(w, x, y, m_rows, heads, w_rows, cols, k_chunk);                                \
    }
// Narrow outputs (routers: 64-128 columns) take 32-column tiles, so the grid still fills the GPU.
GEMM_F32_TC(gemm_f32_tc_n32, 32, false)
GEMM_F32_TC(gemm_f32_tc_n128, 128, false)
GEMM_F32_TC(gemm_f32_tc_t_n128, 128, true)

// y[i] = sum over z < splits of part[z * n + i], in order (gemm_f32_tc's split reductions).
extern "C" __global__ void sum_splits_f32(const float* part, float* y, size_t n, int splits) {
    pdl_enter();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float acc = part[i];
    for (int z = 1; z < splits; z++) acc += part[z * n + i];
    y[i] = acc;
}

// Rows h * rph + row_start + r (r < row_count) of every head, decoded to f32:
// wd [heads, row_count, cols]. One thread per element.
extern "C" __global__ void decode_head_rows(W w, float* wd, int heads, int rph, int row_start, int row_count) {
    pdl_enter();
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)heads * row_count * w.cols) return;
    int j = (int)(e % w.cols), hr = (int)(e / w.cols);
    wd[e] = w_at(w, (hr / row_count) * rph + row_start + hr % row_count, j);
}
