// Shared device helpers for every fp4moe kernel file. No CUDA headers are included: NVRTC
// compiles these sources at run time without an include path, and the CI check compiles them
// the same way.
#pragma once
#include "fp4.cuh"

// Programmatic dependent launch (Hopper and later): the host launches every kernel with
// programmatic stream serialization, so a kernel may start while the one before it still runs.
// `pdl_wait` blocks until every earlier kernel has finished and its writes are visible; nothing
// written by earlier work may be read, and no global memory written, before it. Work that only
// reads weights or fills shared memory can run before it, overlapping the previous kernel's
// tail. `pdl_trigger` lets the next kernel start once every block has passed it: issued right
// after the wait, so at most one kernel waits ahead of the running one. Both are no-ops on older
// GPUs and when the launch did not ask for it.
#ifdef FP4MOE_TRACE_CAP
// Timeline of a replayed graph (FP4MOE_CUDA_TRACE=1; the host defines the entry cap, see
// device.rs `Trace`): thread 0 of block 0 of every kernel appends the %globaltimer instant it
// passed its wait, i.e. when the kernels before it had finished. [0] counts entries; the host
// points each module's copy at one buffer.
extern "C" {
__device__ unsigned long long* fp4moe_trace;
}
#endif
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef FP4MOE_TRACE_CAP
    if (fp4moe_trace && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        const unsigned long long i = atomicAdd(fp4moe_trace, 1ull);
        if (i < FP4MOE_TRACE_CAP) fp4moe_trace[1 + i] = t;
    }
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_trigger();
}
// pdl_enter for a kernel that has issued weight loads before it, so they overlap the previous
// kernel. ptxas moves loads that do not depend on the wait below it: the SASS of every
// tensor-core decode product had its first 16-byte code loads after `griddepcontrol.wait`
// (ACQBULK), waiting for the previous kernel after all. A wait in a branch on a value known only
// at launch stays in a block of its own, with the loads above it. `holds` must be true whenever
// the kernel runs (a precondition the caller names); it is only there to make the branch.
__device__ __forceinline__ void pdl_enter_after_loads(bool holds) {
    if (holds) pdl_enter();
}

// Asks L2 for the 128-byte lines of [p, p + bytes), spread over the block's threads. Kernels issue
// it before `pdl_wait` for inputs that are normally weights (norm weights, RoPE frequencies): a
// prefetch reads nothing into registers, so it is correct even when such an input was written
// by an earlier kernel (L2 is where every SM's writes meet), and the load after the wait then
// finds the line in L2 instead of waiting on DRAM.
__device__ __forceinline__ void prefetch_l2(const void* p, size_t bytes) {
    for (size_t o = (size_t)threadIdx.x * 128; o < bytes; o += (size_t)blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)p + o));
}

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Whether this block is the last of `n` blocks to call this with the same counter (zero before
// the first call; the last block sets it back to zero for the next launch). Every write the
// other blocks made before their call is then visible to this block through L2 (read it with
// __ldcg: L1 is not coherent). Every thread of the block must call it.
__device__ __forceinline__ bool last_block(u32* counter, u32 n) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == n - 1;
        if (last) *counter = 0u;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Weight kinds; the host enum `WeightKind` in src/weight.rs has the same numbering.
#define KIND_MXFP4 0
#define KIND_NVFP4 1
#define KIND_F32 2
#define KIND_BF16 3
#define KIND_F16 4

// A weight matrix [rows, cols] as uploaded by src/weight.rs (`WeightArgs`, same field order).
// FP4 rows are padded to `kp` columns (a multiple of FP4_KP_ALIGN, zero codes and zero scales
// in the pad), so every row starts 16-byte aligned and the GEMM needs no K tail.
struct W {
    const u8* codes;      // [rows, kp/2] packed, element 2j in the low nibble
    const u8* scales;     // [rows, kp/block] block-scale codes
    const float* tscales; // [rows / rows_per_ts] second-level scales
    const void* data;     // dense [rows, cols] f32 | bf16 | f16
    int rows, cols, kp, rows_per_ts, kind;
    // FP4: the decode kernels scale codes by block scale * 2^(FP4_BF16_EXP_OFFSET - s_off) in
    // bf16 and the sums by 2^s_off (src/weight.rs picks s_off so no block scale overflows).
    int s_off;
};

__device__ __forceinline__ int fp4_block(int kind) { return kind == KIND_MXFP4 ? 32 : 16; }

__device__ __forceinline__ float fp4_scale(int kind, u32 code) {
    return kind == KIND_MXFP4 ? fp4_e8m0(code) : fp4_e4m3(code);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16, round to nearest even (as `half::bf16::from_f32` and torch do); NaN stays NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// a * b for bf16 pairs (an fma with -0 added, so -0 products stay -0); subnormal inputs are
// kept, which the E2M1 pair decode relies on (fp4_e2m1_pair_bf16 gives code 1 as 2^-127).
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

// Two f32 -> bf16x2 (round to nearest even, as f32_to_bf16): lo in bits 0..15, hi in 16..31.
__device__ __forceinline__ u32 bf16x2_from(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// D[16 x 8] += A[16 x 16] . B[16 x 8], bf16 inputs, f32 accumulators (PTX fragment layouts).
// Not volatile: the result depends on the operands alone, so the compiler may schedule shared
// loads of the next step (volatile ldmatrix) ahead of it; each accumulator's order of mma stays
// fixed by its data dependence.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8x8 b16 matrices from shared memory, lane l giving the address of row l % 8 of matrix
// l / 8; `_trans` hands each lane the transposed elements (a row-major [k][n] tile as the
// column-major B fragment of mma_bf16).
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// global -> shared copies that do not hold registers (Ampere and later); `valid` false fills
// zeros without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
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
// Waits until at most `pending` (a runtime count, 3 or more meaning 3) of this thread's copy
// groups are in flight.
__device__ __forceinline__ void cp_async_wait_upto(int pending) {
    switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
    }
}

// f32 on the tensor cores with f32 agreement ("3xTF32"): x = hi + lo with hi = x truncated to
// tf32 (10-bit mantissa) and lo = x - hi (exact in f32); a * b ~ hi_a hi_b + hi_a lo_b + lo_a hi_b.
// The mma reads only a tf32 operand's top 19 bits, so lo is truncated there too: with the dropped
// lo_a lo_b the product is off by ~2^-20 relative. Single tf32 (~1e-3) would not pass the
// conformance tolerances, which hold every backend to f32 summation error. (cvt.rna.tf32.f32
// costs about five instructions on sm_90; a mask and a subtraction do the same job here.)
__device__ __forceinline__ void tf32_split(float x, u32& hi, u32& lo) {
    hi = __float_as_uint(x) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}
// The same, kept where it is written: splitting loop-invariant operands (attention's query
// fragments) inside the loop, which the compiler would otherwise hoist into twice the registers.
__device__ __forceinline__ void tf32_split_here(float x, u32& hi, u32& lo) {
    asm volatile("and.b32 %0, %1, 0xffffe000;" : "=r"(hi) : "r"(__float_as_uint(x)));
    lo = __float_as_uint(x - __uint_as_float(hi));
}

// D = A * B + C, m16n8k8, tf32 operands, f32 accumulators. Fragments (g = lane / 4, t = lane % 4):
// a0 (row g, k t), a1 (row g + 8, k t), a2 (row g, k t + 4), a3 (row g + 8, k t + 4);
// b0 (k t, col g), b1 (k t + 4, col g); c0, c1 (row g, cols 2t, 2t + 1), c2, c3 (row g + 8).
__device__ __forceinline__ void mma_tf32(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b, a split (ah + al), b = (b0, b1) split here: the three products, small terms first.
__device__ __forceinline__ void mma_tf32x3(float* c, const u32* ah, const u32* al, float b0, float b1) {
    u32 bh0, bl0, bh1, bl1;
    tf32_split(b0, bh0, bl0);
    tf32_split(b1, bh1, bl1);
    mma_tf32(c, al, bh0, bh1);
    mma_tf32(c, ah, bl0, bl1);
    mma_tf32(c, ah, bh0, bh1);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

// Element (r, k) of any weight kind, decoded exactly as `fp4::dequantize_row` does
// (e2m1 * (block scale * tensor scale)).
__device__ __forceinline__ float w_at(const W& w, int r, int k) {
    if (w.kind == KIND_MXFP4 || w.kind == KIND_NVFP4) {
        int b = fp4_block(w.kind);
        u32 byte = w.codes[(size_t)r * (w.kp / 2) + k / 2];
        u32 code = (k & 1) ? (byte >> 4) : (byte & 15u);
        float s = fp4_scale(w.kind, w.scales[(size_t)r * (w.kp / b) + k / b]) * w.tscales[r / w.rows_per_ts];
        return fp4_e2m1(code) * s;
    }
    size_t i = (size_t)r * w.cols + k;
    if (w.kind == KIND_F32) return ((const float*)w.data)[i];
    if (w.kind == KIND_BF16) return bf16_to_f32(((const u16*)w.data)[i]);
    return f16_to_f32(((const u16*)w.data)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of `blockDim.x` (a multiple of 32, at most 1024) threads; every thread gets
// the total. `red` is 32 floats of shared memory. The order is fixed, so results are repeatable.
__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : -__int_as_float(0x7f800000);
    return warp_max(t);
}

// SiLU with the hardware exp2 and reciprocal (a few ulp, far below the bf16 rounding its
// prefill outputs take next): expf and the IEEE division (with its slow-path branch) made the
// grouped MoE GEMM's gated epilogue ~60 instructions per output, 3-6 % of an MoE layer on the
// H200 (twenty-fifth session). For g -> -inf the divisor overflows and the result is 0, as SiLU.
__device__ __forceinline__ float silu_f(float g) { return __fdividef(g, 1.0f + __expf(-g)); }

// Total order of top-k and argmax: larger value first, ties to the lower index; NaN ranks as
// -inf so a NaN is never picked over a number (the reference's `top_k_indices`).
__device__ __forceinline__ float rank_key(float v) { return v != v ? -__int_as_float(0x7f800000) : v; }
__device__ __forceinline__ bool ranks_before(float ka, int ia, float kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// Read-only 16-byte load that skips L1: weights are streamed once per token.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// FP4 block scales in bf16, shared by the decode products (gemv.cu) and the prefill GEMM (gemm.cu).
struct Fp4Lut {
    u32 scale2[256]; // NVFP4 block-scale code -> bf16 pair (scale * 2^(FP4_BF16_EXP_OFFSET - s_off))
};

__device__ __forceinline__ void lut_init(Fp4Lut* lut, const W& w) {
    if (w.kind == KIND_NVFP4) {
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

// The bf16 pair of block-scale code `code` (see Fp4Lut). E8M0 needs no table: the bf16 of
// 2^(c - 127 + FP4_BF16_EXP_OFFSET - s_off) is its exponent field c + FP4_BF16_EXP_OFFSET - s_off
// alone (within 1..254 for every code src/weight.rs lets through), one multiply-add for both
// halves; a table load per chunk was the top stall of the MoE kernels.
__device__ __forceinline__ u32 scale_pair(const Fp4Lut* lut, const W& w, u32 code) {
    return w.kind == KIND_MXFP4 ? (code + (u32)(FP4_BF16_EXP_OFFSET - w.s_off)) * 0x00800080u : lut->scale2[code];
}

// The factor the FP4 kernels' sums of row r still need after scale_pair's bf16 scaling: the
// tensor scale and, for FP4, 2^s_off.
__device__ __forceinline__ float row_tscale(const W& w, int r) {
    return (w.kind == KIND_MXFP4 || w.kind == KIND_NVFP4)
               ? w.tscales[r / w.rows_per_ts] * __int_as_float((127 + w.s_off) << 23)
               : 1.0f;
}
