// Grouped MoE prefill: the align step (as vLLM's moe_align_block_size) and the combine.
//
// Pairs p = t * k + slot are sorted by expert into blocks of `block` rows: counts -> padded
// offsets -> scatter. Positions inside an expert come from integer atomics, so their order may
// vary between runs, but every pair's output row depends only on its own inputs and the combine
// reads pairs back by (token, slot) in slot order, so the result is bit-for-bit repeatable.
// Padding rows carry pair -1: the GEMM feeds them zeros and never writes their outputs.
#include "common.cuh"

// Ids out of range (callers validate; the trait forbids them) are left out of every expert and
// their token's output becomes NaN in the combine, instead of a wild memory access.
extern "C" __global__ void moe_count(const u32* ids, int pairs, int n_experts, int* counts) {
    pdl_enter();
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < pairs && ids[p] < (u32)n_experts) atomicAdd(&counts[ids[p]], 1);
}

// One block. offsets[e] = padded start of expert e; block_expert[b] = expert of row tile b
// (tiles past the count keep -1 and exit at once); *total = padded row count.
// `tile_m0` null: every expert is padded to whole tiles of `block` rows, tile b starting at row
// b * block. Otherwise (the wgmma kernel's mixed tiles) each expert is padded to half tiles only
// and split into tiles of `block` rows, its last one half as tall where that is all it has
// left: tile b starts at tile_m0[b], tile_m0[*tile_count] = *total. On 128-row tiles that
// saves 64 rows of products wherever an expert's count is up to 64 past a multiple of 128.
extern "C" __global__ void moe_scan(const int* counts, int n_experts, int block, int* offsets, int* fill,
                                    int* block_expert, int* total, int* tile_m0, int* tile_count) {
    pdl_enter();
    __shared__ int start[1025];
    __shared__ int tile0[1025];
    const int pad = tile_m0 ? block / 2 : block;
    if (threadIdx.x == 0) {
        int acc = 0, tiles = 0;
        for (int e = 0; e < n_experts; e++) {
            start[e] = acc;
            tile0[e] = tiles;
            const int rows = (counts[e] + pad - 1) / pad * pad;
            acc += rows;
            tiles += (rows + block - 1) / block;
        }
        start[n_experts] = acc;
        tile0[n_experts] = tiles;
        *total = acc;
        if (tile_m0) {
            tile_m0[tiles] = acc;
            *tile_count = tiles;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
        offsets[e] = start[e];
        fill[e] = 0;
        for (int b = tile0[e]; b < tile0[e + 1]; b++) {
            block_expert[b] = e;
            if (tile_m0) tile_m0[b] = start[e] + (b - tile0[e]) * block;
        }
    }
}

extern "C" __global__ void moe_scatter(const u32* ids, int pairs, int n_experts, const int* offsets, int* fill,
                                       int* sorted, int* inverse) {
    pdl_enter();
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    if (ids[p] >= (u32)n_experts) {
        inverse[p] = -1;
        return;
    }
    int e = (int)ids[p];
    int pos = offsets[e] + atomicAdd(&fill[e], 1);
    sorted[pos] = p;
    inverse[p] = pos;
}

// out[t, h] = shared[t, h] (if given) + sum over slots in order of y[inverse[t * k + slot], h],
// where y rows already carry the router weight.
extern "C" __global__ void moe_combine(const float* y, const int* inverse, const float* shared, float* out,
                                       int n, int k, int hidden) {
    pdl_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * hidden) return;
    int t = (int)(idx / hidden), h = (int)(idx % hidden);
    float acc = shared ? shared[idx] : 0.0f;
    for (int s = 0; s < k; s++) {
        int pos = inverse[t * k + s];
        acc += pos < 0 ? __int_as_float(0x7fc00000) : y[(size_t)pos * hidden + h];
    }
    out[idx] = acc;
}

// The gate/up GEMM's activation rows in expert order, for the wgmma kernel (its TMA copies
// cannot gather): dst[r, :] = src[sorted[r] / k, :] for the padded rows r < *total that hold a
// pair, zeros for padding rows, each 16 columns in gemm_kperm's order (gemm.cu: column 2t + 1
// and 2t + 8 swapped, t < 4), which the `_kperm` GEMMs read. bf16 rows of kp columns, 16 per
// thread (two 16-byte chunks): the 32-bit word t of the output is the low halves of input words
// t and t + 4, word t + 4 their high halves.
extern "C" __global__ void gather_rows_bf16(const u16* src, const int* sorted, int k, const int* total,
                                            u16* dst, size_t rows, int kp) {
    pdl_enter();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, per = (size_t)kp / 16;
    if (i >= rows * per) return;
    const size_t r = i / per, c = (i % per) * 16;
    if ((int)r >= *total) return;
    const int p = sorted[r];
    uint4 a = make_uint4(0, 0, 0, 0), b = a;
    if (p >= 0) {
        const uint4* s = (const uint4*)(src + (size_t)(p / k) * kp + c);
        a = s[0];
        b = s[1];
    }
    const uint4 lo = make_uint4(__byte_perm(a.x, b.x, 0x5410), __byte_perm(a.y, b.y, 0x5410),
                                __byte_perm(a.z, b.z, 0x5410), __byte_perm(a.w, b.w, 0x5410));
    const uint4 hi = make_uint4(__byte_perm(a.x, b.x, 0x7632), __byte_perm(a.y, b.y, 0x7632),
                                __byte_perm(a.z, b.z, 0x7632), __byte_perm(a.w, b.w, 0x7632));
    uint4* d = (uint4*)(dst + r * kp + c);
    d[0] = lo;
    d[1] = hi;
}
