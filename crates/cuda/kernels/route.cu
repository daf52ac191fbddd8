// MoE routers over logits made by an earlier launch, one warp per token (the work per token is in
// route.cuh).
#include "route.cuh"

#define SOFTMAX_WARPS 4

// grid ceil(n / SOFTMAX_WARPS), block SOFTMAX_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SOFTMAX_WARPS * 32)
route_softmax(const float* logits, u32* ids, float* weights, int n, int e, int k, int renormalize) {
    pdl_enter();
    __shared__ float sp[SOFTMAX_WARPS][ROUTE_MAX_E];
    __shared__ int ssel[SOFTMAX_WARPS][ROUTE_MAX_E];
    int wid = threadIdx.x >> 5;
    int t = blockIdx.x * SOFTMAX_WARPS + wid;
    if (t >= n) return; // the whole warp: nothing below synchronises the block
    const float* row = logits + (size_t)t * e;
    softmax_token_any(row, sp[wid], ssel[wid], ids, weights, t, e, k, renormalize);
}

#define SIGMOID_WARPS 2

// grid ceil(n / SIGMOID_WARPS), block SIGMOID_WARPS * 32.
extern "C" __global__ void __launch_bounds__(SIGMOID_WARPS * 32)
route_sigmoid_grouped(const float* logits, const float* bias, u32* ids, float* weights, int n, int e, int k,
                      int n_group, int topk_group, int renormalize, float scale) {
    pdl_enter();
    __shared__ SigmoidSmem smem[SIGMOID_WARPS];
    int wid = threadIdx.x >> 5;
    int t = blockIdx.x * SIGMOID_WARPS + wid;
    if (t >= n) return;
    const float* row = logits + (size_t)t * e;
    sigmoid_token_any(row, bias, smem[wid], ids, weights, t, e, k, n_group, topk_group, renormalize, scale);
}
