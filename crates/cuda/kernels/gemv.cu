// Decode-time products (few activation rows): FP4 and dense GEMV, and the MoE decode path.
//
// Decode is bound by weight bytes, so the kernels are built around the weight stream:
// - a group of LPR lanes owns GEMV_ROWS weight rows and walks their K chunks together; each chunk
//   is one 16-byte load of codes (32 FP4 elements), issued for all rows before any is used, so
//   GEMV_ROWS loads per lane are in flight;
// - the activation chunk (32 floats) is loaded once per chunk and reused for every row the lane
//   owns, which keeps L1 traffic for x near the weight traffic instead of 8x above it;
// - codes are decoded two at a time by bit placement (fp4_e2m1_pair_bf16 from the generated
//   fp4.cuh: two instructions per pair, exact, code * 2^-126 in bf16), scaled in bf16 by the
//   block scale * 2^(126 - s_off) from a 256-entry shared table (exact: at most 5 significant
//   bits), widened to f32 and multiplied by x in f32. A per-lane shared table of the 16 values
//   took about six instructions per element (extract, address, load, multiply), which left the
//   MoE and lm_head products instruction-bound near 1 TB/s on the H100;
// - lane partials are combined with shuffles inside the group, in a fixed order (deterministic).
#include "common.cuh"

#define GEMV_THREADS 128
#define GEMV_ROWS 4

struct Fp4Lut {
    u32 scale2[256]; // block-scale code -> bf16 pair (scale * 2^(FP4_BF16_EXP_OFFSET - s_off))
};

__device__ __forceinline__ void lut_init(Fp4Lut* lut, const W& w) {
    if (w.kind == KIND_MXFP4 || w.kind == KIND_NVFP4) {
        // 2^(FP4_BF16_EXP_OFFSET - s_off) as an f32 (the exponent is 0..126 for every s_off
        // src/weight.rs picks), so the product is exact and rounds to bf16 without loss.
        const float up = __int_as_float((127 + FP4_BF16_EXP_OFFSET - w.s_off) << 23);
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            u32 b = f32_to_bf16(fp4_scale(w.kind, i) * up);
            lut->scale2[i] = b | (b << 16);
        }
    }
    __syncthreads();
}

// bf16 halves of a pair, widened to f32.
__device__ __forceinline__ float bf16_lo(u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16_hi(u32 p) { return __uint_as_float(p & 0xffff0000u); }

// 8 elements of one 32-bit code word (element 2j in the low nibble of byte j) times the block
// scale pair s2, against 8 activations (a = elements 0..3, b = 4..7). The pair decode reads the
// codes at nibbles 3 and 7, then (shifted by 4, 8, 12) 2 and 6, 1 and 5, 0 and 4.
__device__ __forceinline__ float dot8(u32 word, u32 s2, float4 a, float4 b) {
    u32 p3 = bf16x2_mul(fp4_e2m1_pair_bf16(word), s2);
    u32 p2 = bf16x2_mul(fp4_e2m1_pair_bf16(word << 4), s2);
    u32 p1 = bf16x2_mul(fp4_e2m1_pair_bf16(word << 8), s2);
    u32 p0 = bf16x2_mul(fp4_e2m1_pair_bf16(word << 12), s2);
    float s = bf16_lo(p0) * a.x;
    s = fmaf(bf16_hi(p0), b.x, s);
    s = fmaf(bf16_lo(p1), a.y, s);
    s = fmaf(bf16_hi(p1), b.y, s);
    s = fmaf(bf16_lo(p2), a.z, s);
    s = fmaf(bf16_hi(p2), b.z, s);
    s = fmaf(bf16_lo(p3), a.w, s);
    s = fmaf(bf16_hi(p3), b.w, s);
    return s;
}

// acc[r][m] += W[rows[r], :] . x[m, :] over this lane's chunks (lane `lg` of LPR in its group).
// rows[r] < 0 is skipped. FP4 weights: x has stride xs >= kp, zero-padded past cols. Dense
// weights: x has stride xs >= cols. Block scales are applied here; the tensor scale and 2^s_off
// are the caller's (row_tscale).
// `wait_inside`: the caller has not yet passed `pdl_wait`; the first weight chunk is loaded
// before it (weights are never written by earlier kernels), x only after it.
template <int LPR, int MT, int ROWS = GEMV_ROWS>
__device__ __forceinline__ void rows_dot(const Fp4Lut* lut, const W& w, const int* rows, const float* x, int xs,
                                         int mcount, int lg, float (*acc)[MT], bool wait_inside = false) {
    if (w.kind == KIND_MXFP4 || w.kind == KIND_NVFP4) {
        const int chunks = w.kp / 32;
        const int cb = w.kp / 2, nb = w.kp / fp4_block(w.kind);
        const bool nv = w.kind == KIND_NVFP4;
        // Codes and scales of chunk c for every row (zeros past the rows or the chunks).
        auto load = [&](int c, uint4* q, u32* sc) {
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (rows[r] >= 0 && c < chunks) {
                    q[r] = ld_stream16(w.codes + (size_t)rows[r] * cb + c * 16);
                    const u8* sp = w.scales + (size_t)rows[r] * nb;
                    // NVFP4: the chunk's two block scales as one aligned 2-byte load (rows of
                    // scales are kp/16 bytes, a multiple of 8).
                    sc[r] = nv ? (u32)__ldg((const unsigned short*)(sp + 2 * c)) : (u32)sp[c] * 0x101u;
                } else {
                    q[r] = make_uint4(0, 0, 0, 0);
                    sc[r] = 0;
                }
            }
        };
        // The next chunk's loads are issued before this chunk is decoded, so each lane keeps two
        // chunks of every row in flight (with few chunks per lane, waiting for each in turn left
        // the small projections far below the copy bandwidth).
        uint4 q[ROWS], qn[ROWS];
        u32 sc[ROWS], scn[ROWS];
        load(lg, q, sc);
        if (wait_inside) pdl_enter();
        for (int c = lg; c < chunks; c += LPR) {
            load(c + LPR, qn, scn);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= mcount) break;
                const float4* xv = (const float4*)(x + (size_t)m * xs + c * 32);
                float4 x0 = xv[0], x1 = xv[1], x2 = xv[2], x3 = xv[3];
                float4 x4 = xv[4], x5 = xv[5], x6 = xv[6], x7 = xv[7];
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    const u32 s_lo = lut->scale2[sc[r] & 255u], s_hi = lut->scale2[sc[r] >> 8];
                    acc[r][m] += (dot8(q[r].x, s_lo, x0, x1) + dot8(q[r].y, s_lo, x2, x3)) +
                                 (dot8(q[r].z, s_hi, x4, x5) + dot8(q[r].w, s_hi, x6, x7));
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                q[r] = qn[r];
                sc[r] = scn[r];
            }
        }
    } else if (w.kind == KIND_BF16 && (w.cols & 7) == 0) {
        if (wait_inside) pdl_enter();
        // bf16 (routers, lm_head): 16-byte loads of 8 elements, as the FP4 path; a scalar
        // 2-byte load per element left the 128-row router latency-bound at ~70 us on the H100.
        const int chunks = w.cols / 8;
        const u8* base = (const u8*)w.data;
        for (int c = lg; c < chunks; c += LPR) {
            uint4 q[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; r++)
                q[r] = rows[r] >= 0 ? ld_stream16(base + ((size_t)rows[r] * w.cols + c * 8) * 2) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= mcount) break;
                const float4* xv = (const float4*)(x + (size_t)m * xs + c * 8);
                float4 a = xv[0], b = xv[1];
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    float s = bf16_to_f32(q[r].x & 0xffffu) * a.x;
                    s = fmaf(bf16_to_f32(q[r].x >> 16), a.y, s);
                    s = fmaf(bf16_to_f32(q[r].y & 0xffffu), a.z, s);
                    s = fmaf(bf16_to_f32(q[r].y >> 16), a.w, s);
                    s = fmaf(bf16_to_f32(q[r].z & 0xffffu), b.x, s);
                    s = fmaf(bf16_to_f32(q[r].z >> 16), b.y, s);
                    s = fmaf(bf16_to_f32(q[r].w & 0xffffu), b.z, s);
                    s = fmaf(bf16_to_f32(q[r].w >> 16), b.w, s);
                    acc[r][m] += s;
                }
            }
        }
    } else {
        if (wait_inside) pdl_enter();
        for (int k = lg; k < w.cols; k += LPR) {
            float wv[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; r++) wv[r] = rows[r] >= 0 ? w_at(w, rows[r], k) : 0.0f;
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= mcount) break;
                float xv = x[(size_t)m * xs + k];
#pragma unroll
                for (int r = 0; r < ROWS; r++) acc[r][m] = fmaf(wv[r], xv, acc[r][m]);
            }
        }
    }
}

template <int LPR>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The factor rows_dot's sums of row r still need: the tensor scale and, for FP4, 2^s_off.
__device__ __forceinline__ float row_tscale(const W& w, int r) {
    return (w.kind == KIND_MXFP4 || w.kind == KIND_NVFP4)
               ? w.tscales[r / w.rows_per_ts] * __int_as_float((127 + w.s_off) << 23)
               : 1.0f;
}

// y [M, N] = x [M, xs] . W^T for x rows blockIdx.y*MT ..; grid.x covers N in ROWS-row groups.
template <int LPR, int MT, int ROWS>
__device__ void gemv_body(W w, const float* x, int xs, float* y, int m_total) {
    __shared__ Fp4Lut lut;
    lut_init(&lut, w);
    const int groups = GEMV_THREADS / LPR;
    int g = threadIdx.x / LPR, lg = threadIdx.x % LPR;
    int n0 = (blockIdx.x * groups + g) * ROWS;
    int m0 = blockIdx.y * MT;
    int mcount = min(MT, m_total - m0);
    int rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) rows[r] = n0 + r < w.rows ? n0 + r : -1;
    float acc[ROWS][MT];
#pragma unroll
    for (int r = 0; r < ROWS; r++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;
    rows_dot<LPR, MT, ROWS>(&lut, w, rows, x + (size_t)m0 * xs, xs, mcount, lg, acc, true);
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float v = group_sum<LPR>(acc[r][m]);
            if (lg == 0 && rows[r] >= 0 && m < mcount) y[(size_t)(m0 + m) * w.rows + rows[r]] = v * row_tscale(w, rows[r]);
        }
    }
}

// gemv_l<lanes per row>_m<activation rows per block>, GEMV_ROWS weight rows per lane group; the
// _r1 variants give each lane group one row: four times the warps for outputs too narrow to fill
// the GPU, where a few warps per SM decoding four rows each were bound by their own instruction
// latency (q_proj at one token: 12 us, 8 cycles between issues, 12 % occupancy).
#define GEMV(LPR, MT, ROWS, NAME)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                                   \
        NAME(W w, const float* x, int xs, float* y, int m_total) {                                               \
        gemv_body<LPR, MT, ROWS>(w, x, xs, y, m_total);                                                          \
    }
GEMV(8, 1, GEMV_ROWS, gemv_l8_m1)
GEMV(16, 1, GEMV_ROWS, gemv_l16_m1)
GEMV(32, 1, GEMV_ROWS, gemv_l32_m1)
GEMV(8, 4, GEMV_ROWS, gemv_l8_m4)
GEMV(16, 4, GEMV_ROWS, gemv_l16_m4)
GEMV(32, 4, GEMV_ROWS, gemv_l32_m4)
GEMV(8, 1, 1, gemv_l8_m1_r1)
GEMV(16, 1, 1, gemv_l16_m1_r1)
GEMV(32, 1, 1, gemv_l32_m1_r1)

// MoE decode, stage 1: act[p, j] = silu(gate_e[j] . x_t) * (up_e[j] . x_t) for pair p = (t, slot),
// e = ids[p] (ids == 0: expert 0, one pair per token; the shared expert). gate_up rows per
// expert are [gate (inter); up (inter)]. act has stride act_s (the down weight's kp; the pad is
// zeroed by the host). grid (pairs, ceil(inter / (groups * 2))): pairs on x, which has no 65535 cap.
template <int LPR>
__device__ void moe_gate_up_body(W w, const float* x, int xs, const u32* ids, int k_slots, int inter, float* act,
                                 int act_s, int n_experts) {
    __shared__ Fp4Lut lut;
    lut_init(&lut, w);
    pdl_enter(); // ids and x come from earlier kernels
    const int groups = GEMV_THREADS / LPR;
    int g = threadIdx.x / LPR, lg = threadIdx.x % LPR;
    int p = blockIdx.x;
    int t = ids ? p / k_slots : p;
    u32 eid = ids ? ids[p] : 0u;
    // An id out of range (the trait asks callers to validate) reads nothing and shows as NaN.
    bool bad = eid >= (u32)n_experts;
    int e = bad ? 0 : (int)eid;
    int j0 = (blockIdx.y * groups + g) * 2;
    int base = e * 2 * inter;
    int rows[GEMV_ROWS];
    rows[0] = j0 < inter ? base + j0 : -1;
    rows[1] = j0 + 1 < inter ? base + j0 + 1 : -1;
    rows[2] = j0 < inter ? base + inter + j0 : -1;
    rows[3] = j0 + 1 < inter ? base + inter + j0 + 1 : -1;
    float acc[GEMV_ROWS][1];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r][0] = 0.0f;
    rows_dot<LPR, 1>(&lut, w, rows, x + (size_t)t * xs, xs, 1, lg, acc);
    float v[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) v[r] = group_sum<LPR>(acc[r][0]);
    if (lg == 0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (rows[i] < 0) continue;
            float gate = v[i] * row_tscale(w, rows[i]);
            float up = v[2 + i] * row_tscale(w, rows[2 + i]);
            act[(size_t)p * act_s + j0 + i] = bad ? __int_as_float(0x7fc00000) : silu_f(gate) * up;
        }
    }
}

// MoE decode, stage 2: one block row per (token, term), term 0 the shared expert when present,
// then the routed slots in order: part[t, term, h] = weight * (down_e[h] . act[t, slot]) (the
// shared term has weight 1). Spreading the terms over blocks keeps every SM streaming weights;
// the sum runs in `moe_sum_terms`, in term order, so the result is deterministic without atomics.
// grid (tokens * terms, ceil(hidden / rows per block)).
template <int LPR>
__device__ void moe_down_body(W w, const float* act, int act_s, const u32* ids, const float* wts, int k_slots,
                              int hidden, W ws, const float* act_sh, int act_sh_s, int has_shared, float* part,
                              int n_experts) {
    __shared__ Fp4Lut lut;
    const int terms = k_slots + has_shared;
    const int t = blockIdx.x / terms, term = blockIdx.x % terms;
    const bool sh = has_shared && term == 0;
    const W wk = sh ? ws : w;
    lut_init(&lut, wk);
    pdl_enter(); // ids, weights and activations come from earlier kernels
    const int groups = GEMV_THREADS / LPR;
    int g = threadIdx.x / LPR, lg = threadIdx.x % LPR;
    int h0 = (blockIdx.y * groups + g) * GEMV_ROWS;
    const int p = t * k_slots + (term - has_shared);
    u32 eid = sh ? 0u : ids[p];
    bool bad = !sh && eid >= (u32)n_experts;
    int row0 = sh ? 0 : (bad ? 0 : (int)eid) * hidden;
    float wt = sh ? 1.0f : wts[p];
    const float* a = sh ? act_sh + (size_t)t * act_sh_s : act + (size_t)p * act_s;
    int as = sh ? act_sh_s : act_s;
    int rows[GEMV_ROWS];
    float acc[GEMV_ROWS][1];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        rows[r] = h0 + r < hidden ? row0 + h0 + r : -1;
        acc[r][0] = 0.0f;
    }
    rows_dot<LPR, 1>(&lut, wk, rows, a, as, 1, lg, acc);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        float v = group_sum<LPR>(acc[r][0]);
        if (lg == 0 && rows[r] >= 0)
            part[((size_t)t * terms + term) * hidden + h0 + r] =
                bad ? __int_as_float(0x7fc00000) : wt * (v * row_tscale(wk, rows[r]));
    }
}

// out[t, h] = sum over terms in order of part[t, term, h].
extern "C" __global__ void moe_sum_terms(const float* part, float* out, int n, int terms, int hidden) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * hidden) return;
    int t = (int)(idx / hidden), h = (int)(idx % hidden);
    const float* pt = part + (size_t)t * terms * hidden + h;
    float acc = pt[0];
    for (int s = 1; s < terms; s++) acc += pt[(size_t)s * hidden];
    out[idx] = acc;
}

#define MOE_DECODE(LPR)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                                   \
        moe_gate_up_l##LPR(W w, const float* x, int xs, const u32* ids, int k_slots, int inter, float* act,      \
                           int act_s, int n_experts) {                                                           \
        moe_gate_up_body<LPR>(w, x, xs, ids, k_slots, inter, act, act_s, n_experts);                             \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                                   \
        moe_down_l##LPR(W w, const float* act, int act_s, const u32* ids, const float* wts, int k_slots,         \
                        int hidden, W ws, const float* act_sh, int act_sh_s, int has_shared, float* part,        \
                        int n_experts) {                                                                         \
        moe_down_body<LPR>(w, act, act_s, ids, wts, k_slots, hidden, ws, act_sh, act_sh_s, has_shared, part,     \
                           n_experts);                                                                           \
    }
MOE_DECODE(8)
MOE_DECODE(16)
MOE_DECODE(32)
