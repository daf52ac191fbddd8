// Linear, prefill path: a GEMM tiled over TILE_M activation rows x NT output columns per
// workgroup, K in steps of KT. NT is the tile variant (`N_TILE`, from `LinearPath::Prefill`).
// Weights are decoded once per tile into workgroup memory; 256 threads as 16 x 16, each owning
// 4 x NT/16 outputs strided by 16 so neighbouring threads read neighbouring words. The outputs
// live in four vec4 accumulators (one per row; NT = 32 leaves two lanes unused): per-thread
// arrays indexed in loops went to local memory on the H100 (0.5 TFLOP/s).

struct P {
    m: u32,
    n: u32,
    k: u32,
    n_off: u32,
    y_stride: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const NT: u32 = N_TILEu;
const KT: u32 = 32u;
const TN: u32 = NT / 16u;
var<workgroup> xs: array<f32, TILE_M * KT>; // [KT][TILE_M]
var<workgroup> ws: array<f32, KT * NT>; // [KT][NT]

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m0 = wid.x * TILE_M;
    let n0 = wid.y * NT;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        for (var e = lid; e < TILE_M * KT; e += WG) {
            let mm = e / KT;
            let kk = e % KT;
            var v = 0.0;
            if (m0 + mm < p.m && k0 + kk < p.k) {
                v = x[(m0 + mm) * p.k + k0 + kk];
            }
            xs[kk * TILE_M + mm] = v;
        }
        for (var e = lid; e < NT * (KT / 8u); e += WG) {
            let nn = e / (KT / 8u);
            let kk = (e % (KT / 8u)) * 8u;
            var w: array<f32, 8>;
            if (n0 + nn < p.n) {
                w = w_get8(n0 + nn, p.k, k0 + kk);
            }
            ws[(kk + 0u) * NT + nn] = w[0];
            ws[(kk + 1u) * NT + nn] = w[1];
            ws[(kk + 2u) * NT + nn] = w[2];
            ws[(kk + 3u) * NT + nn] = w[3];
            ws[(kk + 4u) * NT + nn] = w[4];
            ws[(kk + 5u) * NT + nn] = w[5];
            ws[(kk + 6u) * NT + nn] = w[6];
            ws[(kk + 7u) * NT + nn] = w[7];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let a = x_col(kk * TILE_M + ty);
            let b = ws_row(kk * NT + tx);
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    gemm_store(m0 + ty, n0 + tx, acc0);
    gemm_store(m0 + ty + 16u, n0 + tx, acc1);
    gemm_store(m0 + ty + 32u, n0 + tx, acc2);
    gemm_store(m0 + ty + 48u, n0 + tx, acc3);
}

// Rows ty, ty + 16, ty + 32, ty + 48 of one k of the activation tile.
fn x_col(i: u32) -> vec4<f32> {
    return vec4<f32>(xs[i], xs[i + 16u], xs[i + 32u], xs[i + 48u]);
}

// Columns tx + 16j (j < TN; the rest 0) of one k of the weight tile.
fn ws_row(i: u32) -> vec4<f32> {
    var v = vec4<f32>(ws[i], ws[i + 16u], 0.0, 0.0);
    if (TN > 2u) {
        v.z = ws[i + 32u];
        v.w = ws[i + 48u];
    }
    return v;
}

fn gemm_store(m: u32, n: u32, v: vec4<f32>) {
    for (var j = 0u; j < TN; j++) {
        if (m < p.m && n + 16u * j < p.n) {
            y[m * p.y_stride + p.n_off + n + 16u * j] = v[j];
        }
    }
}
