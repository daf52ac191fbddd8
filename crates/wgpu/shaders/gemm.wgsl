// Linear, prefill path: a GEMM tiled over TILE_M activation rows x NT output columns per
// workgroup, K in steps of KT. NT is the tile variant (`N_TILE`, from `LinearPath::Prefill`).
// Weights are decoded once per tile into workgroup memory; 256 threads as 16 x 16, each owning
// TILE_M/16 x NT/16 outputs strided by 16 so neighbouring threads read neighbouring words.

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
const TM: u32 = TILE_M / 16u;
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
    var acc: array<array<f32, TN>, TM>;
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
            for (var i = 0u; i < 8u; i++) {
                ws[(kk + i) * NT + nn] = w[i];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            var a: array<f32, TM>;
            for (var i = 0u; i < TM; i++) {
                a[i] = xs[kk * TILE_M + ty + 16u * i];
            }
            for (var j = 0u; j < TN; j++) {
                let b = ws[kk * NT + tx + 16u * j];
                for (var i = 0u; i < TM; i++) {
                    acc[i][j] += a[i] * b;
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let m = m0 + ty + 16u * i;
        for (var j = 0u; j < TN; j++) {
            let n = n0 + tx + 16u * j;
            if (m < p.m && n < p.n) {
                y[m * p.y_stride + p.n_off + n] = acc[i][j];
            }
        }
    }
}
