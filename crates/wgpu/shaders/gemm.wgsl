// Linear, prefill path: a GEMM tiled over TILE_M activation rows x NT output columns per
// workgroup, K in steps of KT. NT is the tile variant (`N_TILE`, from `LinearPath::Prefill`).
// Weights are decoded once per tile into workgroup memory; 256 threads as 16 x 16, thread (tx, ty)
// owning rows 4ty..4ty+3 and columns TN*tx..TN*tx+TN-1 (TN = NT/16), so each k step is one
// 16-byte workgroup load of x and one of w per thread. The outputs live in four vec4
// accumulators (one per row; NT = 32 leaves two lanes unused): per-thread arrays indexed in
// loops went to local memory on the H100 (0.5 TFLOP/s).
// `gemm_heads_t` is MLA's transposed per-head product at prefill on the same tiles (below).

struct P {
    m: u32,
    n: u32,
    k: u32,
    n_off: u32,
    y_stride: u32,
    // gemm_heads_t: heads (grid z), weight rows per head, first row used in each head.
    heads: u32,
    head_rows: u32,
    head_row0: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const NT: u32 = N_TILEu;
const KT: u32 = 32u;
const TN: u32 = NT / 16u;
var<workgroup> xs: array<vec4<f32>, TILE_M * KT / 4u>; // [KT][TILE_M], 4 rows a vector
var<workgroup> ws: array<vec4<f32>, KT * NT / 4u>; // [KT][NT], 4 columns a vector

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m0 = wid.x * TILE_M;
    let n0 = wid.y * NT;
    var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        stage_x(lid, m0, k0, p.k, 0u);
        for (var e = lid; e < NT * (KT / 8u); e += WG) {
            let nn = e / (KT / 8u);
            let kk = (e % (KT / 8u)) * 8u;
            var w: array<f32, 8>;
            if (n0 + nn < p.n) {
                w = w_get8(n0 + nn, p.k, k0 + kk);
            }
            ws_store8(kk, nn, w);
        }
        workgroupBarrier();
        acc = tile_products(acc, tx, ty);
        workgroupBarrier();
    }
    tile_store(m0 + 4u * ty, n0 + TN * tx, p.n_off, acc);
}

// y[m, h, c] = Σ_r W_h[r, c] x[m, h, r] for head h = grid z (rows h * head_rows + head_row0 +
// r, r < p.k; x [m, heads, p.k]; y [m, heads, p.n]): the reduction runs over the weight's
// rows, so a k step's weight tile is KT rows of NT columns, each thread decoding one word (8
// columns under one scale) into two vectors.
@compute @workgroup_size(WG)
fn gemm_heads_t(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let h = wid.z;
    let m0 = wid.x * TILE_M;
    let n0 = wid.y * NT;
    var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        stage_x(lid, m0, k0, p.heads * p.k, h * p.k);
        for (var e = lid; e < KT * (NT / 8u); e += WG) {
            let kk = e / (NT / 8u);
            let c8 = (e % (NT / 8u)) * 8u;
            var w: array<f32, 8>;
            if (k0 + kk < p.k) {
                w = w_get8(h * p.head_rows + p.head_row0 + k0 + kk, p.n, n0 + c8);
            }
            ws[(kk * NT + c8) / 4u] = vec4<f32>(w[0], w[1], w[2], w[3]);
            ws[(kk * NT + c8) / 4u + 1u] = vec4<f32>(w[4], w[5], w[6], w[7]);
        }
        workgroupBarrier();
        acc = tile_products(acc, tx, ty);
        workgroupBarrier();
    }
    tile_store(m0 + 4u * ty, n0 + TN * tx, h * p.n, acc);
}

// x tile of the k step from k0: rows m0.. (row m at x[m * stride + off]) as [KT][TILE_M].
fn stage_x(lid: u32, m0: u32, k0: u32, stride: u32, off: u32) {
    for (var e = lid; e < TILE_M * KT; e += WG) {
        let mm = e / KT;
        let kk = e % KT;
        var v = 0.0;
        if (m0 + mm < p.m && k0 + kk < p.k) {
            v = x[(m0 + mm) * stride + off + k0 + kk];
        }
        xs[(kk * TILE_M + mm) / 4u][mm % 4u] = v;
    }
}

// The four accumulators of a thread: rows 4ty + i, its TN columns.
struct Acc {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
}

fn tile_products(acc: Acc, tx: u32, ty: u32) -> Acc {
    var r = acc;
    for (var kk = 0u; kk < KT; kk++) {
        let a = xs[kk * (TILE_M / 4u) + ty];
        let b = cols(ws[kk * (NT / 4u) + tx * TN / 4u], tx);
        r.a0 += a.x * b;
        r.a1 += a.y * b;
        r.a2 += a.z * b;
        r.a3 += a.w * b;
    }
    return r;
}

fn tile_store(m: u32, n: u32, off: u32, acc: Acc) {
    gemm_store(m, n, off, acc.a0);
    gemm_store(m + 1u, n, off, acc.a1);
    gemm_store(m + 2u, n, off, acc.a2);
    gemm_store(m + 3u, n, off, acc.a3);
}

// Decoded weights of column nn, k rows kk..kk+8 (unrolled: a per-thread array indexed in a loop
// goes to local memory).
fn ws_store8(kk: u32, nn: u32, w: array<f32, 8>) {
        ws[((kk + 0u) * NT + nn) / 4u][nn % 4u] = w[0];
        ws[((kk + 1u) * NT + nn) / 4u][nn % 4u] = w[1];
        ws[((kk + 2u) * NT + nn) / 4u][nn % 4u] = w[2];
        ws[((kk + 3u) * NT + nn) / 4u][nn % 4u] = w[3];
        ws[((kk + 4u) * NT + nn) / 4u][nn % 4u] = w[4];
        ws[((kk + 5u) * NT + nn) / 4u][nn % 4u] = w[5];
        ws[((kk + 6u) * NT + nn) / 4u][nn % 4u] = w[6];
        ws[((kk + 7u) * NT + nn) / 4u][nn % 4u] = w[7];
}

// Thread tx's TN columns of a weight-tile vector (its 4 columns, or the half of them for TN = 2;
// the rest 0).
fn cols(v: vec4<f32>, tx: u32) -> vec4<f32> {
    if (TN == 4u) {
        return v;
    }
    return select(vec4<f32>(v.zw, 0.0, 0.0), vec4<f32>(v.xy, 0.0, 0.0), tx % 2u == 0u);
}

fn gemm_store(m: u32, n: u32, off: u32, v: vec4<f32>) {
    for (var j = 0u; j < TN; j++) {
        if (m < p.m && n + j < p.n) {
            y[m * p.y_stride + off + n + j] = v[j];
        }
    }
}
