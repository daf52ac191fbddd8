// Decode-time products (few activation rows): FP4 and dense GEMV, and the MoE decode path. One
// activation row of FP4 weights goes to the tensor-core kernels at the end of this file (gemv_tc,
// moe_*_tc); the SIMT row kernels below take several rows, dense weights, and one row when the
// host asks for them.
//
// Decode is bound by weight bytes, so the kernels are built around the weight stream:
// - a group of LPR lanes owns GEMV_ROWS weight rows and walks their K chunks together; each chunk
//   is one 16-byte load of codes (32 FP4 elements), issued for all rows before any is used, so
//   GEMV_ROWS loads per lane are in flight;
// - the activation chunk (32 floats) is loaded once per chunk and reused for every row the lane
//   owns, which keeps L1 traffic for x near the weight traffic instead of 8x above it;
// - codes are decoded two at a time by bit placement (fp4_e2m1_pair_bf16 from the generated
//   fp4.cuh: two instructions per pair, exact, code * 2^-126 in bf16), scaled in bf16 by the
//   block scale * 2^(126 - s_off) (exact: at most 5 significant bits; E4M3 from a 256-entry
//   shared table, E8M0 computed, scale_pair), widened to f32 and multiplied by x in f32. A
//   per-lane shared table of the 16 values took about six instructions per element (extract,
//   address, load, multiply), which left the MoE and lm_head products instruction-bound near
//   1 TB/s on the H100;
// - lane partials are combined with shuffles inside the group, in a fixed order (deterministic).
#include "common.cuh"

#define GEMV_THREADS 128
#define GEMV_ROWS 4

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

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ unsigned dyn_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Copies x [mcount, kp] (row stride xs; kp a multiple of 32 floats) into sx [mcount, kp] with the
// float4s of each 32-float
// chunk c rotated by XOR with c & 7, then waits for the block. A lane reads whole chunks, and the
// lanes of a warp read consecutive chunks: straight from global memory every 16-byte x load of
// a warp touched 32 cache lines, which held o_proj's one-row-per-group GEMV at 13 us with L1 82 %
// busy and DRAM 9 %; from the rotated copy each phase of eight lanes hits eight distinct banks.
__device__ __forceinline__ void stage_x(float* sx, const float* x, int xs, int kp, int mcount) {
    const int per_row = kp / 4, n = mcount * per_row;
    const float4* src = (const float4*)x;
    float4* dst = (float4*)sx;
    for (int i0 = threadIdx.x; i0 < n; i0 += 4 * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < n) {
                const int m = i / per_row;
                v[u] = src[m * (xs / 4) + (i - m * per_row)];
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < n) {
                const int m = i / per_row, f = i - m * per_row;
                dst[m * per_row + (f ^ ((f >> 3) & 7))] = v[u];
            }
        }
    }
    __syncthreads();
}

// acc[r][m] += W[rows[r], :] . x[m, :] over this lane's chunks (lane `lg` of LPR in its group).
// rows[r] < 0 is skipped. FP4 weights: x has stride xs >= kp, zero-padded past cols. Dense
// weights: x has stride xs >= cols. Block scales are applied here; the tensor scale and 2^s_off
// are the caller's (row_tscale).
// `wait_inside`: the caller has not yet passed `pdl_wait`; the first weight chunk is loaded
// before it (weights are never written by earlier kernels), x only after it.
// `sx`: FP4 only, shared memory for mcount x rows of w.kp floats (stage_x), or null to read x
// from global memory; every thread of the block must call rows_dot with the same x.
template <int LPR, int MT, int ROWS = GEMV_ROWS>
__device__ __forceinline__ void rows_dot(const Fp4Lut* lut, const W& w, const int* rows, const float* x, int xs,
                                         int mcount, int lg, float (*acc)[MT], bool wait_inside = false,
                                         float* sx = nullptr) {
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
        if (wait_inside) pdl_enter_after_loads(w.rows > 0); // no launch has a zero grid
        int rot = 0; // float4 j of chunk c sits at j ^ (c & rot)
        if (sx) {
            stage_x(sx, x, xs, w.kp, mcount);
            x = sx;
            xs = w.kp;
            rot = 7;
        }
        for (int c = lg; c < chunks; c += LPR) {
            load(c + LPR, qn, scn);
            const int sw = c & rot;
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= mcount) break;
                const float4* xv = (const float4*)(x + (size_t)m * xs + c * 32);
                float4 x0 = xv[0 ^ sw], x1 = xv[1 ^ sw], x2 = xv[2 ^ sw], x3 = xv[3 ^ sw];
                float4 x4 = xv[4 ^ sw], x5 = xv[5 ^ sw], x6 = xv[6 ^ sw], x7 = xv[7 ^ sw];
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    const u32 s_lo = scale_pair(lut, w, sc[r] & 255u), s_hi = scale_pair(lut, w, sc[r] >> 8);
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
        // bf16 (routers, lm_head): 16-byte loads of 8 elements, as the FP4 path; a scalar
        // 2-byte load per element left the 128-row router latency-bound at ~70 us on the H100.
        // As there, the first chunk is requested before the wait and the next one before each
        // chunk's products.
        const int chunks = w.cols / 8;
        const u8* base = (const u8*)w.data;
        auto load = [&](int c, uint4* q) {
#pragma unroll
            for (int r = 0; r < ROWS; r++)
                q[r] = rows[r] >= 0 && c < chunks ? ld_stream16(base + ((size_t)rows[r] * w.cols + c * 8) * 2)
                                                  : make_uint4(0, 0, 0, 0);
        };
        uint4 q[ROWS], qn[ROWS];
        load(lg, q);
        if (wait_inside) pdl_enter_after_loads(w.rows > 0); // no launch has a zero grid
        for (int c = lg; c < chunks; c += LPR) {
            load(c + LPR, qn);
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
#pragma unroll
            for (int r = 0; r < ROWS; r++) q[r] = qn[r];
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

// Sum over the LPR lanes of a group, in a fixed order; every lane of the group gets it. Groups
// wider than a warp (LPR 64, 128: one or two rows per block, for long rows under one wave of
// blocks) add their warps' sums through shared memory; every thread of the block must call it.
template <int LPR>
__device__ __forceinline__ float group_sum(float v) {
    if (LPR <= 32) {
#pragma unroll
        for (int o = (LPR < 32 ? LPR : 32) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
    __shared__ float red[GEMV_THREADS / 32];
    v = warp_sum(v);
    __syncthreads(); // red may still be read from the previous call
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    const int w0 = (threadIdx.x / LPR) * (LPR / 32);
    float t = red[w0];
#pragma unroll
    for (int i = 1; i < LPR / 32; i++) t += red[w0 + i];
    return t;
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
    // The host gives x a shared-memory copy (MT rows of kp floats) where it fits.
    extern __shared__ float4 gemv_sx[];
    rows_dot<LPR, MT, ROWS>(&lut, w, rows, x + (size_t)m0 * xs, xs, mcount, lg, acc, true,
                            dyn_smem_bytes() ? (float*)gemv_sx : nullptr);
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
// latency (q_proj at one token: 12 us, 8 cycles between issues, 12 % occupancy). In the l64 and
// l128 variants a row's lanes span two or four warps, so each lane of a long row (o_proj's 4096
// columns: four chunks per lane of 32) waits for one or two chunks instead of four in turn.
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
GEMV(64, 1, 1, gemv_l64_m1_r1)
GEMV(128, 1, 1, gemv_l128_m1_r1)

// What a MoE decode block works on, shared by the SIMT and tensor-core kernels. Built in two
// parts: the block's role before the programmatic-launch wait (weights only), its expert after
// it (ids come from the router). An id out of range (the trait asks callers to validate) reads
// expert 0 and marks the outputs NaN.
struct GateUpJob {
    bool sh;     // the shared expert of token t (blocks past the pairs)
    int p, t;    // pair (routed) and token
    int in;      // intermediate size of the block's weight
    W wk;        // the block's weight (routed or shared)
    float* out;  // the act row to write
    bool bad;    // after expert(): the id was out of range
    int base;    // after expert(): the expert's first gate row
    __device__ __forceinline__ void expert(const u32* ids, int n_experts) {
        const u32 eid = sh ? 0u : ids[p];
        bad = eid >= (u32)n_experts;
        base = (bad ? 0 : (int)eid) * 2 * in;
    }
};
__device__ __forceinline__ GateUpJob gate_up_job(const W& w, int k_slots, int inter, float* act, int act_s,
                                                 int pairs, const W& ws, int inter_sh, float* act_sh,
                                                 int act_sh_s) {
    GateUpJob j;
    j.p = blockIdx.x;
    j.sh = j.p >= pairs;
    j.t = j.sh ? j.p - pairs : j.p / k_slots;
    j.in = j.sh ? inter_sh : inter;
    j.wk = j.sh ? ws : w;
    j.out = j.sh ? act_sh + (size_t)j.t * act_sh_s : act + (size_t)j.p * act_s;
    j.bad = false;
    j.base = 0;
    return j;
}

// Stage 2: term `term` of token t (term 0 the shared expert when present, then the slots).
struct DownJob {
    bool sh;
    int t, term, terms, p; // p: the routed pair of the term
    W wk;
    const float* a;        // the act row
    int as;                // its stride
    bool bad;              // after expert()
    int row0;              // after expert(): the expert's first row
    float wt;              // after expert(): the router weight (1 for the shared expert)
    __device__ __forceinline__ void expert(const u32* ids, const float* wts, int n_experts, int hidden) {
        const u32 eid = sh ? 0u : ids[p];
        bad = !sh && eid >= (u32)n_experts;
        row0 = sh ? 0 : (bad ? 0 : (int)eid) * hidden;
        wt = sh ? 1.0f : wts[p];
    }
    // where this term's value of output row h goes
    __device__ __forceinline__ size_t at(int hidden, int h) const { return ((size_t)t * terms + term) * hidden + h; }
};
__device__ __forceinline__ DownJob down_job(const W& w, const float* act, int act_s, int k_slots, const W& ws,
                                            const float* act_sh, int act_sh_s, int has_shared) {
    DownJob j;
    j.terms = k_slots + has_shared;
    j.t = blockIdx.x / j.terms;
    j.term = blockIdx.x % j.terms;
    j.sh = has_shared && j.term == 0;
    j.p = j.t * k_slots + (j.term - has_shared);
    j.wk = j.sh ? ws : w;
    j.a = j.sh ? act_sh + (size_t)j.t * act_sh_s : act + (size_t)j.p * act_s;
    j.as = j.sh ? act_sh_s : act_s;
    j.bad = false;
    j.row0 = 0;
    j.wt = 1.0f;
    return j;
}

// MoE decode, stage 1: act[p, j] = silu(gate_e[j] . x_t) * (up_e[j] . x_t) for the routed pairs
// p = (t, slot) < pairs, e = ids[p]; blocks past the pairs serve the shared expert (weight ws,
// act_sh[t]) of token t = p - pairs, in the same launch. gate_up rows per expert are [gate (inter);
// up (inter)]. act rows have stride act_s (the down weight's kp; the pad is zeroed by the host).
// grid (pairs + shared tokens, ceil(max inter / (groups * 2))): pairs on x, which has no 65535 cap.
template <int LPR>
__device__ void moe_gate_up_body(W w, const float* x, int xs, const u32* ids, int k_slots, int inter, float* act,
                                 int act_s, int n_experts, int pairs, W ws, int inter_sh, float* act_sh,
                                 int act_sh_s) {
    __shared__ Fp4Lut lut;
    GateUpJob job = gate_up_job(w, k_slots, inter, act, act_s, pairs, ws, inter_sh, act_sh, act_sh_s);
    const W& wk = job.wk;
    lut_init(&lut, wk);
    pdl_enter(); // ids and x come from earlier kernels
    job.expert(ids, n_experts);
    const int groups = GEMV_THREADS / LPR;
    int g = threadIdx.x / LPR, lg = threadIdx.x % LPR;
    const int t = job.t, in = job.in, base = job.base;
    const bool bad = job.bad;
    float* out = job.out;
    int j0 = (blockIdx.y * groups + g) * 2;
    int rows[GEMV_ROWS];
    rows[0] = j0 < in ? base + j0 : -1;
    rows[1] = j0 + 1 < in ? base + j0 + 1 : -1;
    rows[2] = j0 < in ? base + in + j0 : -1;
    rows[3] = j0 + 1 < in ? base + in + j0 + 1 : -1;
    float acc[GEMV_ROWS][1];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r][0] = 0.0f;
    extern __shared__ float4 moe_sx[]; // x's shared copy, when the host gives room for it
    rows_dot<LPR, 1>(&lut, wk, rows, x + (size_t)t * xs, xs, 1, lg, acc, false,
                     dyn_smem_bytes() ? (float*)moe_sx : nullptr);
    float v[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) v[r] = group_sum<LPR>(acc[r][0]);
    if (lg == 0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (rows[i] < 0) continue;
            float gate = v[i] * row_tscale(wk, rows[i]);
            float up = v[2 + i] * row_tscale(wk, rows[2 + i]);
            out[j0 + i] = bad ? __int_as_float(0x7fc00000) : silu_f(gate) * up;
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
    DownJob job = down_job(w, act, act_s, k_slots, ws, act_sh, act_sh_s, has_shared);
    const W& wk = job.wk;
    lut_init(&lut, wk);
    pdl_enter(); // ids, weights and activations come from earlier kernels
    job.expert(ids, wts, n_experts, hidden);
    const int groups = GEMV_THREADS / LPR;
    int g = threadIdx.x / LPR, lg = threadIdx.x % LPR;
    int h0 = (blockIdx.y * groups + g) * GEMV_ROWS;
    const int row0 = job.row0;
    int rows[GEMV_ROWS];
    float acc[GEMV_ROWS][1];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        rows[r] = h0 + r < hidden ? row0 + h0 + r : -1;
        acc[r][0] = 0.0f;
    }
    extern __shared__ float4 moe_sx[]; // act's shared copy, when the host gives room for it
    rows_dot<LPR, 1>(&lut, wk, rows, job.a, job.as, 1, lg, acc, false, dyn_smem_bytes() ? (float*)moe_sx : nullptr);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        float v = group_sum<LPR>(acc[r][0]);
        if (lg == 0 && rows[r] >= 0)
            part[job.at(hidden, h0 + r)] = job.bad ? __int_as_float(0x7fc00000) : job.wt * (v * row_tscale(wk, rows[r]));
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
                           int act_s, int n_experts, int pairs, W ws, int inter_sh, float* act_sh,              \
                           int act_sh_s) {                                                                       \
        moe_gate_up_body<LPR>(w, x, xs, ids, k_slots, inter, act, act_s, n_experts, pairs, ws, inter_sh, act_sh, \
                              act_sh_s);                                                                         \
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

// ---- Tensor-core decode products (one activation row per block) ----
// The SIMT row loop above spends about eight instructions per weight element (two-instruction
// pair decode, the bf16 scale product, widening to f32 and an f32 FMA per element, plus the
// loop), which held every decode product near 0.5 TB/s on the H100 at 25 % occupancy. Here a
// warp takes a tile of 16 weight rows as the A operand of `mma.sync.m16n8k16` (bf16, f32
// accumulators) and x as B: the codes are decoded and scaled exactly as above, and the tensor
// core does the products and sums. Fragment layouts (PTX ISA, m16n8k16 .bf16): lane = 4 g + t;
// A regs {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..}; B regs
// {k 2t..2t+1, col g}, {k 2t+8.., col g}; C {row g, col 2t..2t+1}, {row g+8, col 2t..}.
// - K runs in steps of TC_STEP columns: lane t of a quad reads the 16-byte code chunk t of the
//   step (32 columns, one MXFP4 block) of rows g and g+8; word wd of the chunk holds pairs
//   (wd, i) = columns (8 wd + i, 8 wd + i + 4) that the pair decode yields, and mma j = 2 wd + h
//   takes pairs 2h (k 2t..) and 2h + 1 (k 2t+8..). The k order inside an mma is a permutation of
//   the columns, the same for A and B, so the sums are unchanged.
// - x is exact through three bf16 terms x = t0 + t1 + t2 (as the prefill GEMM's activations)
//   placed in B's columns 0, 1, 2 (columns 3..7 repeat terms 0..2: their products land in D
//   columns no sum reads), so one mma computes all three and a row's value is D[r][0] + D[r][1] +
//   D[r][2]. The block builds every step's B fragments once into shared memory (tc_build_b), so
//   every lane reads its 8 bytes per mma unconditionally (a predicated read and a zeroing move
//   per mma cost ~16 instructions a step). Column 3 held a zero term until the twentieth
//   session; dropping it keeps the sums' bits (x + 0 = x) and takes a quarter off the fragments.
// - Each warp's weight bytes for all of its steps (at most TC_STAGE_MAX) are copied into shared
//   memory with cp.async as soon as its rows are known, when the launch gives the room
//   (tc_stage; the host gives it to every launch but the MoE gate/up, where it measured
//   slower): every byte in flight before the wait, without holding registers, and each step
//   waits only for its own copy group. Otherwise each lane keeps one step ahead in registers
//   (registers for more steps made these kernels slower in the thirteenth session).
// - The block's TC_WARPS warps split the steps (warp w takes w, w + TC_WARPS, ...) and add
//   their row sums in warp order, so results are deterministic.
#define TC_STEP 128
#define TC_TERMS 3
#define TC_SLOTS 3 // B fragment slots per mma and lane quad: one per term
#define TC_WARPS 4
#define TC_ROWS 16
#define TC_STAGE_MAX 4 // steps per warp a staged launch copies ahead (tc_stage)
// Shared bytes of one staged step of a warp: rows g and g + 8's 16-byte code chunk per lane, then
// 8 scale bytes per lane group and row (NVFP4: the step's four 2-byte block-scale pairs; MXFP4:
// four codes). Host: TC_STAGE_STEP in src/backend.rs.
#define TC_STAGE_CODES (2 * 32 * 16)
#define TC_STAGE_STEP (TC_STAGE_CODES + 2 * 8 * 8)

extern __shared__ uint2 tc_frag[]; // the B fragments (dynamic shared memory of every _tc kernel)

// B fragments of x [kp] for every step: frag[((s * 8 + j) * TC_SLOTS + n) * 4 + t] = the
// {b0, b1} of mma j of step s for lanes with g & 3 = n (term n of x; lanes g & 3 = 3 read term 0)
// and tid-in-group t. Ends with a block barrier. (The host sizes the buffer: TC_SLOTS * 8 bytes
// per 4 columns.)
__device__ __forceinline__ void tc_build_b(uint2* frag, const float* x, int kp) {
    const int entries = kp / 4; // (kp / TC_STEP) steps x 8 mmas x 4 quad lanes
    for (int i = threadIdx.x; i < entries; i += blockDim.x) {
        const int t = i & 3, j = (i >> 2) & 7, st = i >> 5;
        const int c0 = st * TC_STEP + t * 32 + (j >> 1) * 8 + 2 * (j & 1);
        // b0: columns (c0, c0 + 4) = pair 2h of the word; b1: (c0 + 1, c0 + 5) = pair 2h + 1.
        float v0 = x[c0], v1 = x[c0 + 4], v2 = x[c0 + 1], v3 = x[c0 + 5];
        uint2* out = frag + (size_t)(st * 8 + j) * TC_SLOTS * 4 + t;
#pragma unroll
        for (int n = 0; n < TC_TERMS; n++) {
            const u32 b0 = bf16x2_from(v0, v1), b1 = bf16x2_from(v2, v3);
            out[n * 4] = make_uint2(b0, b1);
            // The remainders are exact in f32 (Sterbenz), so only the last term rounds.
            v0 -= bf16_lo(b0);
            v1 -= bf16_hi(b0);
            v2 -= bf16_lo(b1);
            v3 -= bf16_hi(b1);
        }
    }
    __syncthreads();
}

// This warp's staging room for `steps` K steps split over `warps` warps: the end of the dynamic
// shared memory (the B fragments take its start, sized by the host for the launch's longest row,
// so a shorter row's room still ends at the same place), or null when the launch gave none or a
// warp has more than TC_STAGE_MAX steps.
__device__ __forceinline__ u8* tc_stage(int steps, int warps) {
    const int spw = (steps + warps - 1) / warps;
    const unsigned room = (unsigned)(warps * spw * TC_STAGE_STEP), have = dyn_smem_bytes();
    if (spw > TC_STAGE_MAX || have < room + (unsigned)(steps * TC_STEP * TC_SLOTS * 2)) return nullptr;
    return (u8*)tc_frag + have - room + (threadIdx.x >> 5) * spw * TC_STAGE_STEP;
}

// This warp's share of the products of tile rows r0 (lane group g) and r1 (g + 8) (< 0: zero
// rows) with x, over steps s0, s0 + ds, ... < kp / TC_STEP. `after_first` runs once the first
// step's codes are requested (the caller's pdl wait and tc_build_b: weights are never written by
// earlier kernels, so their loads may precede the wait). Returns the rows' sums, block scales
// applied (tensor scale and 2^s_off are the caller's: row_tscale), in the lanes with t == 0.
// KIND is the weight's kind, fixed so the scale code has one path (tc_rows picks it): with the
// kind a runtime value both kinds' scale code ran in the loop (moe_gate_up_tc: ~295 -> ~240
// instructions a step, gemv_tc_w16 ~370 -> ~220, SASS of the NVRTC cubins).
template <int KIND, typename F>
__device__ __forceinline__ void tc_rows_kind(const Fp4Lut* lut, W w, int r0, int r1, const uint2* frag, int s0,
                                             int ds, float& y0, float& y1, F&& after_first) {
    w.kind = KIND;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int steps = w.kp / TC_STEP, cb = w.kp / 2, nb = w.kp / fp4_block(KIND);
    // A step's scale bytes start here in a row's scales (NVFP4: 8, two blocks per lane; MXFP4:
    // 4, one per lane); the lane's are at 2t or t from there.
    auto scale_step = [&](int st) { return KIND == KIND_NVFP4 ? st * 8 : st * 4; };
    const int scale_lane = KIND == KIND_NVFP4 ? 2 * t : t;
    auto load = [&](int st, uint4* q, u32* sc) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = h ? r1 : r0;
            if (r >= 0 && st < steps) {
                q[h] = ld_stream16(w.codes + (size_t)r * cb + st * (TC_STEP / 2) + t * 16);
                const u8* sp = w.scales + (size_t)r * nb + scale_step(st) + scale_lane;
                sc[h] = KIND == KIND_NVFP4 ? (u32)__ldg((const unsigned short*)sp) : (u32)*sp * 0x101u;
            } else {
                q[h] = make_uint4(0, 0, 0, 0);
                sc[h] = 0;
            }
        }
    };
    // Two accumulators (mma h = 0 and h = 1 of each word), so consecutive mma do not wait on
    // each other's results.
    float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const uint2* fl = frag + ((g & 3) == 3 ? 0 : g & 3) * 4 + t; // this lane's term
    auto step = [&](int st, const uint4* q, const u32* sc) {
        const uint2* fs = fl + (size_t)st * 8 * TC_SLOTS * 4;
        const u32 lo0 = scale_pair(lut, w, sc[0] & 255u), hi0 = scale_pair(lut, w, sc[0] >> 8);
        const u32 lo1 = scale_pair(lut, w, sc[1] & 255u), hi1 = scale_pair(lut, w, sc[1] >> 8);
        const u32 wa[4] = {q[0].x, q[0].y, q[0].z, q[0].w}, wb[4] = {q[1].x, q[1].y, q[1].z, q[1].w};
#pragma unroll
        for (int wd = 0; wd < 4; wd++) {
            const u32 sa = wd < 2 ? lo0 : hi0, sb = wd < 2 ? lo1 : hi1;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                // pair i of a word (columns i, i + 4) comes from the shift bringing nibble i to 3
                u32 a[4];
                a[0] = bf16x2_mul(fp4_e2m1_pair_bf16(wa[wd] << (4 * (3 - 2 * h))), sa);
                a[1] = bf16x2_mul(fp4_e2m1_pair_bf16(wb[wd] << (4 * (3 - 2 * h))), sb);
                a[2] = bf16x2_mul(fp4_e2m1_pair_bf16(wa[wd] << (4 * (2 - 2 * h))), sa);
                a[3] = bf16x2_mul(fp4_e2m1_pair_bf16(wb[wd] << (4 * (2 - 2 * h))), sb);
                const uint2 b = fs[(2 * wd + h) * TC_SLOTS * 4];
                mma_bf16(c[h], a, b.x, b.y);
            }
        }
    };
    u8* stage = tc_stage(steps, ds);
    if (stage) {
        // Every step's codes and scales requested at once (invalid rows fill zeros), one copy
        // group per step, then after_first; each step waits only for its own group. A lane reads
        // its own code chunks; the scale words are copied by lanes t < 2 (NVFP4) or t = 0
        // (MXFP4) of each group, hence the warp sync.
        int n = 0;
#pragma unroll
        for (int i = 0; i < TC_STAGE_MAX; i++) {
            const int st = s0 + i * ds;
            if (st >= steps) break;
            n++;
            u8* sp = stage + i * TC_STAGE_STEP;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = h ? r1 : r0;
                const bool ok = r >= 0;
                cp_async16(sp + (h * 32 + lane) * 16,
                           ok ? w.codes + (size_t)r * cb + st * (TC_STEP / 2) + t * 16 : w.codes, ok);
                if (t < (KIND == KIND_NVFP4 ? 2 : 1))
                    cp_async4(sp + TC_STAGE_CODES + (h * 8 + g) * 8 + 4 * t,
                              ok ? w.scales + (size_t)r * nb + scale_step(st) + 4 * t : w.scales, ok);
            }
            cp_async_commit();
        }
        after_first();
#pragma unroll
        for (int i = 0; i < TC_STAGE_MAX; i++) {
            const int st = s0 + i * ds;
            if (st >= steps) break;
            cp_async_wait_upto(n - 1 - i);
            __syncwarp();
            const u8* sp = stage + i * TC_STAGE_STEP;
            uint4 q[2];
            u32 sc[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                q[h] = *(const uint4*)(sp + (h * 32 + lane) * 16);
                const u8* ss = sp + TC_STAGE_CODES + (h * 8 + g) * 8;
                sc[h] = KIND == KIND_NVFP4 ? (u32) * (const unsigned short*)(ss + scale_lane) : (u32)ss[t] * 0x101u;
            }
            step(st, q, sc);
        }
    } else {
        uint4 q[2], qn[2];
        u32 sc[2], scn[2];
        load(s0, q, sc);
        after_first();
        for (int st = s0; st < steps; st += ds) {
            load(st + ds, qn, scn);
            step(st, q, sc);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                q[h] = qn[h];
                sc[h] = scn[h];
            }
        }
    }
    // Lane t = 0 holds columns 0, 1 (terms 0, 1), lane t = 1 columns 2, 3 (term 2, and term 0
    // again in column 3, which is left out).
    const bool c3 = t == 1;
    float v0 = (c[0][0] + c[1][0]) + (c3 ? 0.0f : c[0][1] + c[1][1]);
    float v1 = (c[0][2] + c[1][2]) + (c3 ? 0.0f : c[0][3] + c[1][3]);
    v0 += __shfl_down_sync(0xffffffffu, v0, 1);
    v1 += __shfl_down_sync(0xffffffffu, v1, 1);
    y0 = v0;
    y1 = v1;
}
template <typename F>
__device__ __forceinline__ void tc_rows(const Fp4Lut* lut, const W& w, int r0, int r1, const uint2* frag, int s0,
                                        int ds, float& y0, float& y1, F&& after_first) {
    if (w.kind == KIND_NVFP4) tc_rows_kind<KIND_NVFP4>(lut, w, r0, r1, frag, s0, ds, y0, y1, after_first);
    else tc_rows_kind<KIND_MXFP4>(lut, w, r0, r1, frag, s0, ds, y0, y1, after_first);
}

// Row r's tensor-scale factor (row_tscale), requested where it is called: the asm volatile load
// stays above later waits and barriers, so a product's tail (after its last barrier) does not
// wait a global-load latency for it (the SASS had it there, right before the store).
__device__ __forceinline__ float row_tscale_early(const W& w, int r) {
    if (w.kind != KIND_MXFP4 && w.kind != KIND_NVFP4) return 1.0f;
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(w.tscales + r / w.rows_per_ts));
    return v * __int_as_float((127 + w.s_off) << 23);
}

// The tile's row sums of every warp, added in warp order: red[w][i] for tile row i = g (y0) or
// g + 8 (y1). Ends with a block barrier; the caller reads tile_sum<WARPS>(red, i), i < TC_ROWS.
__device__ __forceinline__ void tc_collect(float (*red)[TC_ROWS], float y0, float y1) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if ((lane & 3) == 0) {
        red[warp][lane >> 2] = y0;
        red[warp][(lane >> 2) + 8] = y1;
    }
    __syncthreads();
}
template <int WARPS = TC_WARPS>
__device__ __forceinline__ float tile_sum(const float (*red)[TC_ROWS], int i) {
    float v = red[0][i];
#pragma unroll
    for (int k = 1; k < WARPS; k++) v += red[k][i];
    return v;
}

// y [1, N] = x [1, kp] . W^T for FP4 W: one block of WARPS warps per TC_ROWS rows. Outputs with
// few rows (k/v, o_proj) take wider blocks, so their long rows still spread over enough warps:
// with four warps per block, 32 blocks of Qwen3's k/v took 8.3 us against 5.5 us for the SIMT
// kernel on four-warp rows. Dynamic shared memory: the B fragments (TC_SLOTS * 2 * kp bytes).
template <int WARPS>
__device__ __forceinline__ void gemv_tc_body(W w, const float* x, float* y, int tile) {
    __shared__ Fp4Lut lut;
    __shared__ float red[WARPS][TC_ROWS];
    lut_init(&lut, w);
    const int g = (threadIdx.x & 31) >> 2, n0 = tile * TC_ROWS;
    const int r0 = n0 + g < w.rows ? n0 + g : -1, r1 = n0 + g + 8 < w.rows ? n0 + g + 8 : -1;
    const int i = threadIdx.x;
    const bool writes = i < TC_ROWS && n0 + i < w.rows;
    const float ts = writes ? row_tscale_early(w, n0 + i) : 0.0f;
    float y0, y1;
    tc_rows(&lut, w, r0, r1, tc_frag, threadIdx.x >> 5, WARPS, y0, y1, [&] {
        pdl_enter_after_loads(dyn_smem_bytes() != 0); // the B fragments' room: always given
        tc_build_b(tc_frag, x, w.kp);
    });
    tc_collect(red, y0, y1);
    if (writes) y[n0 + i] = tile_sum<WARPS>(red, i) * ts;
}
// Up to three weights sharing one x (Qwen3's q / k / v, GLM's q_a / kv_a) in one launch: blocks
// [0, t1) take w0's tiles, [t1, t2) w1's, the rest w2's (t2 = gridDim.x for two weights). Each
// weight's GEMV otherwise waits for the previous one's (programmatic launch) and then for its
// own weights: separate latency chains of 5-7 us each in a decode step.
#define GEMV_TC(WARPS)                                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_tc_w##WARPS(W w, const float* x, float* y) { \
        gemv_tc_body<WARPS>(w, x, y, blockIdx.x);                                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                     \
        gemv_tc3_w##WARPS(W w0, W w1, W w2, int t1, int t2, const float* x, float* y0, float* y1, float* y2) {   \
        const int b = blockIdx.x;                                                                                \
        if (b < t1)                                                                                              \
            gemv_tc_body<WARPS>(w0, x, y0, b);                                                                   \
        else if (b < t2)                                                                                         \
            gemv_tc_body<WARPS>(w1, x, y1, b - t1);                                                              \
        else                                                                                                     \
            gemv_tc_body<WARPS>(w2, x, y2, b - t2);                                                              \
    }
GEMV_TC(4)
GEMV_TC(8)
GEMV_TC(16)

// MoE decode stage 1 on the tensor cores (as moe_gate_up_l*): block (p, jb) takes intermediate
// outputs j0 = 8 jb .. j0 + 7 of pair p: tile rows 0..7 their gate rows, 8..15 their up rows, so
// a tile row and the one 8 below meet in one lane. Blocks past the pairs serve the shared expert.
// grid (pairs + shared tokens, ceil(max inter / 8)).
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32, 8) // 64 registers: the grid in one wave
    moe_gate_up_tc(W w, const float* x, int xs, const u32* ids, int k_slots, int inter, float* act, int act_s,
                   int n_experts, int pairs, W ws, int inter_sh, float* act_sh, int act_sh_s) {
    __shared__ Fp4Lut lut;
    __shared__ float red[TC_WARPS][TC_ROWS];
    GateUpJob job = gate_up_job(w, k_slots, inter, act, act_s, pairs, ws, inter_sh, act_sh, act_sh_s);
    const W& wk = job.wk;
    const int in = job.in, t = job.t;
    const int j0 = blockIdx.y * 8;
    if (j0 >= in) return; // the whole block (a shorter shared or routed intermediate)
    lut_init(&lut, wk);
    pdl_enter(); // ids and x come from earlier kernels
    job.expert(ids, n_experts);
    const int base = job.base;
    const int g = (threadIdx.x & 31) >> 2;
    const int r0 = j0 + g < in ? base + j0 + g : -1, r1 = j0 + g < in ? base + in + j0 + g : -1;
    const int i = threadIdx.x;
    const bool writes = i < 8 && j0 + i < in;
    const float ts_gate = writes ? row_tscale_early(wk, base + j0 + i) : 0.0f;
    const float ts_up = writes ? row_tscale_early(wk, base + in + j0 + i) : 0.0f;
    float y0, y1;
    tc_rows(&lut, wk, r0, r1, tc_frag, threadIdx.x >> 5, TC_WARPS, y0, y1,
            [&] { tc_build_b(tc_frag, x + (size_t)t * xs, wk.kp); });
    tc_collect(red, y0, y1);
    if (writes) {
        const float gate = tile_sum(red, i) * ts_gate;
        const float up = tile_sum(red, i + 8) * ts_up;
        job.out[j0 + i] = job.bad ? __int_as_float(0x7fc00000) : silu_f(gate) * up;
    }
}

// MoE decode stage 2 on the tensor cores (as moe_down_l*): block (t * terms + term, hb) takes
// hidden rows 16 hb .. + 15 of the term's expert; part[t, term, h] = weight * (down_e[h] . act).
// grid (tokens * terms, ceil(hidden / 16)).
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)
    moe_down_tc(W w, const float* act, int act_s, const u32* ids, const float* wts, int k_slots, int hidden, W ws,
                const float* act_sh, int act_sh_s, int has_shared, float* part, int n_experts) {
    __shared__ Fp4Lut lut;
    __shared__ float red[TC_WARPS][TC_ROWS];
    DownJob job = down_job(w, act, act_s, k_slots, ws, act_sh, act_sh_s, has_shared);
    const W& wk = job.wk;
    lut_init(&lut, wk);
    // Ids and router weights before the wait, so the first weight loads overlap the gate/up
    // kernel: they were written two launches back (moe_gate_up_tc runs between, and this grid
    // starts only once every block of it has passed its own wait or exited, block (0, 0) always
    // waiting), so they are complete and visible here. act comes from gate/up: after the wait.
    job.expert(ids, wts, n_experts, hidden);
    const int row0 = job.row0;
    const int h0 = blockIdx.y * TC_ROWS, g = (threadIdx.x & 31) >> 2;
    const int r0 = h0 + g < hidden ? row0 + h0 + g : -1, r1 = h0 + g + 8 < hidden ? row0 + h0 + g + 8 : -1;
    const int i = threadIdx.x;
    const bool writes = i < TC_ROWS && h0 + i < hidden;
    const float ts = writes ? row_tscale_early(wk, row0 + h0 + i) : 0.0f;
    float y0, y1;
    tc_rows(&lut, wk, r0, r1, tc_frag, threadIdx.x >> 5, TC_WARPS, y0, y1, [&] {
        pdl_enter_after_loads(dyn_smem_bytes() != 0); // the B fragments' room: always given
        tc_build_b(tc_frag, job.a, wk.kp);
    });
    tc_collect(red, y0, y1);
    if (writes) part[job.at(hidden, h0 + i)] = job.bad ? __int_as_float(0x7fc00000) : job.wt * (tile_sum(red, i) * ts);
}

// MLA's absorbed per-head products at decode (Backend::head_linear with few rows), on the GEMV
// machinery; the per-element `w_at` kernels in attention.cu (one scalar code load and two
// constant-table lookups per element) took 14 us per GLM call and remain for shapes these do not
// take.
//
// Not transposed: y[m, h, j] = W[h * rph + row_start + j, :] . x[m, h, :]. LPR lanes per row
// group, GEMV_ROWS rows each; FP4 weights need cols == kp (x rows are not padded).
// grid (ceil(row_count / rows per block), heads, m_rows).
#define HEAD_LPR 16
extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
    head_rows_gemv(W w, const float* x, float* y, int m_rows, int heads, int rph, int row_start, int row_count) {
    __shared__ Fp4Lut lut;
    lut_init(&lut, w);
    const int groups = GEMV_THREADS / HEAD_LPR;
    const int g = threadIdx.x / HEAD_LPR, lg = threadIdx.x % HEAD_LPR;
    const int h = blockIdx.y, m = blockIdx.z;
    const int j0 = (blockIdx.x * groups + g) * GEMV_ROWS;
    int rows[GEMV_ROWS];
    float acc[GEMV_ROWS][1];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        rows[r] = j0 + r < row_count ? h * rph + row_start + j0 + r : -1;
        acc[r][0] = 0.0f;
    }
    const float* xh = x + ((size_t)m * heads + h) * w.cols;
    rows_dot<HEAD_LPR, 1>(&lut, w, rows, xh, w.cols, 1, lg, acc, true);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        float v = group_sum<HEAD_LPR>(acc[r][0]);
        if (lg == 0 && rows[r] >= 0) y[((size_t)m * heads + h) * row_count + j0 + r] = v * row_tscale(w, rows[r]);
    }
}

// Transposed, FP4 with kp <= 16 * 32: y[m, h, j] = sum_i W[h * rph + row_start + i, j] * x[m, h, i].
// Block (h, m, z) takes rows z * HEAD_COL_GROUPS .. + HEAD_COL_GROUPS, one per 16-lane group;
// lane lg owns the 32 columns of chunk lg. The two groups of a warp are added with a shuffle,
// the warps' column sums in warp order, and the blocks' sums (part [splits, m, h, 512]) by the
// last block of each (h, m) to finish (last_block), in z order, so the result is deterministic.
// One block per (h, m) walking every row used 20 of the SMs: 12-14 us per GLM call.
// grid (heads, m_rows, splits = ceil(row_count / HEAD_COL_GROUPS)), block HEAD_COL_GROUPS * 16.
#define HEAD_COL_GROUPS 32
extern "C" __global__ void __launch_bounds__(HEAD_COL_GROUPS * 16)
    head_cols_gemv(W w, const float* x, float* y, int m_rows, int heads, int rph, int row_start, int row_count,
                   float* part, u32* done) {
    __shared__ Fp4Lut lut;
    __shared__ float red[HEAD_COL_GROUPS / 2][16 * 32];
    lut_init(&lut, w);
    const int g = threadIdx.x / 16, lg = threadIdx.x % 16;
    const int h = blockIdx.x, m = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
    const int chunks = w.kp / 32, cb = w.kp / 2, nb = w.kp / fp4_block(w.kind);
    const int i = z * HEAD_COL_GROUPS + g;
    const bool live = lg < chunks && i < row_count;
    const int wr = h * rph + row_start + i;
    uint4 q = make_uint4(0, 0, 0, 0);
    u32 sc = 0;
    float xi = 0.0f;
    if (live) {
        q = ld_stream16(w.codes + (size_t)wr * cb + lg * 16);
        const u8* sp = w.scales + (size_t)wr * nb;
        sc = w.kind == KIND_NVFP4 ? (u32)__ldg((const unsigned short*)(sp + 2 * lg)) : (u32)sp[lg] * 0x101u;
        xi = row_tscale(w, wr);
    }
    pdl_enter(); // x comes from an earlier kernel; the weights are already in flight
    if (live) xi *= x[((size_t)m * heads + h) * row_count + i];
    float acc[32];
    const u32 s_lo = scale_pair(&lut, w, sc & 255u), s_hi = scale_pair(&lut, w, sc >> 8);
    const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int wd = 0; wd < 4; wd++) {
        const u32 s2 = wd < 2 ? s_lo : s_hi;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            // pair (r, r + 4) of the word comes from the shift that brings nibble r to 3
            const u32 p = bf16x2_mul(fp4_e2m1_pair_bf16(words[wd] << (4 * (3 - r))), s2);
            acc[8 * wd + r] = bf16_lo(p) * xi;
            acc[8 * wd + r + 4] = bf16_hi(p) * xi;
        }
    }
    // Column j = 32 lg + e sits at red[.][e * 16 + lg], so the 16 lanes' stores hit 16 banks.
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int e = 0; e < 32; e++) {
        const float v = acc[e] + __shfl_xor_sync(0xffffffffu, acc[e], 16);
        if ((threadIdx.x & 16) == 0) red[warp][e * 16 + lg] = v;
    }
    __syncthreads();
    const size_t row = (size_t)m * heads + h;
    const size_t plane = (size_t)m_rows * heads * w.cols;
    for (int j = threadIdx.x; j < w.cols; j += blockDim.x) {
        const int at = (j % 32) * 16 + j / 32;
        float t = red[0][at];
#pragma unroll
        for (int q2 = 1; q2 < HEAD_COL_GROUPS / 2; q2++) t += red[q2][at];
        part[z * plane + row * w.cols + j] = t;
    }
    // The last block of this (h, m) adds the splits in order.
    if (!last_block(&done[row], (u32)splits)) return;
    for (int j = threadIdx.x; j < w.cols; j += blockDim.x) {
        float t = 0.0f;
        for (int zz = 0; zz < splits; zz++) t += __ldcg(&part[zz * plane + row * w.cols + j]);
        y[row * w.cols + j] = t;
    }
}
