// FP4 GEMMs on cooperative matrices (tensor cores through Vulkan's VK_KHR_cooperative_matrix):
// the prefill linear, MLA's per-head products and both grouped MoE GEMMs in one kernel, `p.mode`
// choosing the rows and the epilogue. Only f16 x f16 -> f32 is offered everywhere, so:
// - A (activations) arrives as two f16 terms and a row factor from split.wgsl; both terms are
//   multiplied into the same accumulator;
// - B (weights) is decoded per k step into workgroup memory as exact f16 values. NVFP4's E4M3
//   block scale times an E2M1 value always fits f16 (2^-10 ..= 2688). MXFP4's E8M0 scales do
//   not: each weight row is scaled by 2^-(e_max - 13) (e_max its largest block scale, computed
//   at upload), so its largest value is at most 6 * 2^13; blocks more than ~2^36 below the
//   row's largest lose their bits to f16 underflow, far below what an f32 sum of the row keeps
//   anyway. The row factor 2^e_max * 2^-13 times the tensor scale is applied in the epilogue;
// - each of the 8 subgroups owns a 2S x 2S block (four S x S accumulators, S = 16) of the
//   64-row tile, 2 x 4 of them: a workgroup covers 64 rows x BN = 128 columns. A thread
//   fetches its share of the next k step into registers before the current step's products,
//   and stores it to workgroup memory after them;
// - accumulators go through workgroup memory (`cs`) for the epilogue, since a cooperative
//   matrix has no per-element access.
// The workgroup is exactly COOP_SUBGROUPS subgroups: the host enables this path only where the
// adapter's subgroup size is fixed, and at least 32 (256 threads stage a k step).

struct P {
    mode: u32, // MODE_*
    m: u32, // linear: activation rows; MoE: sorted (token, slot) pairs
    n: u32, // output columns: linear: this chunk's rows; gate/up: I; down: H
    k: u32, // weight columns
    kv: u32, // row stride of a_hi / a_lo in 8-half vectors
    n_off: u32, // linear: output column of the chunk's first row
    y_stride: u32, // linear: output row stride
    topk: u32, // MoE: slots per token (gate/up: A row = sorted pair / topk)
    e_lo: u32, // MoE: experts held by this weight chunk, and its first row
    e_hi: u32,
    row0: u32,
    max_tiles: u32,
    heads: u32, // per-head products: heads (grid z), weight rows per head, first row used
    head_rows: u32,
    head_row0: u32,
    _pad: u32,
}

const MODE_LINEAR: u32 = 0u;
const MODE_GATE_UP: u32 = 1u;
const MODE_DOWN: u32 = 2u;
// y[m, z, n] = x[m, z, :] . W[z * head_rows + head_row0 + n, :]: a linear per head z, its rows
// m * heads + z of x and of y (y_stride = n).
const MODE_HEADS: u32 = 3u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: P;
// The terms split.wgsl wrote as f16 pairs, read here as halves.
@group(0) @binding(1) var<storage, read> a_hi: array<vec4<f16>>; // [rows, 2 kv]
@group(0) @binding(2) var<storage, read> a_lo: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> a_rf: array<f32>; // [rows]
@group(0) @binding(4) var<storage, read_write> y: array<f32>; // linear: [m, y_stride]; gate/up: [pairs, I]; down: [pairs, H]
@group(0) @binding(5) var<storage, read> sorted: array<u32>; // MoE: [pairs] (moe.wgsl)
@group(0) @binding(6) var<storage, read> tiles: array<u32>; // MoE: [max_tiles, 3]
@group(0) @binding(11) var<storage, read> w_row_exp: array<u32>; // [chunk rows] MXFP4: largest finite scale code (weight.rs)

const S: u32 = COOP_SIZEu;
const CM: u32 = TILE_M / (2u * S); // subgroup rows of the grid
const CN: u32 = COOP_SUBGROUPS / CM; // subgroup columns
const BN: u32 = CN * 2u * S;
const BK: u32 = COOP_BK;
// The f16 tiles are held as vectors of 4 halves, so that staging them is vector stores; the
// cooperative loads take offsets and strides in vectors.
const AV: u32 = COOP_STRIDE / 4u;

var<workgroup> as_hi: array<vec4<f16>, TILE_M * AV>; // [TILE_M][COOP_STRIDE] halves
var<workgroup> as_lo: array<vec4<f16>, TILE_M * AV>;
var<workgroup> bs: array<vec4<f16>, BN * AV>; // [BN][COOP_STRIDE]: column-major K x BN
var<workgroup> cs: array<f32, COOP_SUBGROUPS * 2u * S * S>; // two S x S accumulators per subgroup
var<workgroup> arow: array<u32, TILE_M>; // A row of each tile row, or NONE
var<workgroup> orow: array<u32, TILE_M>; // output row of each tile row, or NONE
var<workgroup> ras: array<f32, TILE_M>; // A row factor
var<workgroup> wrow: array<u32, BN>; // chunk weight row of each B column, or NONE
var<workgroup> wexp: array<i32, BN>; // MXFP4: the row's largest block-scale code
var<workgroup> rowf: array<f32, BN>; // factor of each B column

struct Tile {
    e: u32,
    r0: u32,
    r1: u32,
    live: u32,
}

// Cooperative operations need uniform control flow, which a tile read from storage is not to
// the WGSL analysis: one thread reads it, all take it through workgroupUniformLoad.
var<workgroup> tile_wg: Tile;

fn tile(t: u32) -> Tile {
    if (t >= p.max_tiles) {
        return Tile(0u, 0u, 0u, 0u);
    }
    let e = tiles[3u * t];
    if (e == 0xffffffffu || e < p.e_lo || e >= p.e_hi) {
        return Tile(0u, 0u, 0u, 0u);
    }
    return Tile(e, tiles[3u * t + 1u], tiles[3u * t + 2u], 1u);
}

fn scale_code(row: u32, cols: u32, col: u32) -> u32 {
    let i = row * (cols / W_BLOCK) + col / W_BLOCK;
    return (w_scales[i / 4u] >> (8u * (i & 3u))) & 255u;
}

// Blocks of 32 are MXFP4 (E8M0 scales), blocks of 16 NVFP4 (E4M3).
const MX: bool = W_BLOCK == 32u;

// Multiplier of a decoded pair (value * 2^-14) that makes it the B tile's value: MXFP4
// value * 2^(code - e_max + 13) (below 2^-24 it underflows in the f16 conversion), NVFP4 value
// times the E4M3 scale (exact in f16).
fn block_scale(code: u32, emax: i32) -> f32 {
    if (MX) {
        // 2^x built from its exponent field (a library ldexp handles cases this never has).
        let x = clamp(i32(code) - emax + 27, -126, 127);
        return bitcast<f32>(u32(x + 127) << 23u);
    }
    return fp4_e4m3(code) * 16384.0;
}

// The factor of a B column's products: what block_scale left out, times the tensor scale.
fn column_factor(row: u32, emax: i32) -> f32 {
    if (MX) {
        return fp4_e8m0(u32(emax)) * (1.0 / 8192.0) * w_tscale[row];
    }
    return w_tscale[row];
}

// The 8 codes of word w times sc, as halves, into the B tile at vector `at`. The generated pair
// decode gives codes j and j + 4 (value * 2^-14); the f16 conversions are exact.
fn put_b8(at: u32, w: u32, sc: f32) {
    let v0 = fp4_e2m1_pair_f16(w) * sc;
    let v1 = fp4_e2m1_pair_f16(w >> 4u) * sc;
    let v2 = fp4_e2m1_pair_f16(w >> 8u) * sc;
    let v3 = fp4_e2m1_pair_f16(w >> 12u) * sc;
    bs[at] = vec4<f16>(vec4<f32>(v0.x, v1.x, v2.x, v3.x));
    bs[at + 1u] = vec4<f16>(vec4<f32>(v0.y, v1.y, v2.y, v3.y));
}

// One thread's share of a k step, fetched into registers a step ahead: 8 halves of each A term
// (tile row lid / 4, vector lid % 4) and 16 codes of a B column (lid / 2, half lid % 2) with
// their scale code. TILE_M * 4 = BN * 2 = 256 threads' worth; the host makes the workgroup at
// least that.
struct Stage {
    ah0: vec4<f16>,
    ah1: vec4<f16>,
    al0: vec4<f16>,
    al1: vec4<f16>,
    w0: u32,
    w1: u32,
    code: u32,
}

fn fetch(lid: u32, k0: u32) -> Stage {
    let z = vec4<f16>(0.0h);
    var st = Stage(z, z, z, z, 0u, 0u, 0u);
    if (lid >= TILE_M * 4u) {
        return st;
    }
    let a = arow[lid / 4u];
    if (a != NONE) {
        let at = 2u * (a * p.kv + k0 / 8u + lid % 4u);
        st.ah0 = a_hi[at];
        st.ah1 = a_hi[at + 1u];
        st.al0 = a_lo[at];
        st.al1 = a_lo[at + 1u];
    }
    let row = wrow[lid / 2u];
    let col = k0 + 16u * (lid % 2u);
    if (row != NONE && col < p.k) {
        let wi = row * (p.k / 8u) + col / 8u;
        st.w0 = w_word(wi);
        if (col + 8u < p.k) {
            st.w1 = w_word(wi + 1u);
        }
        st.code = scale_code(row, p.k, col);
    }
    return st;
}

fn put(lid: u32, st: Stage) {
    if (lid >= TILE_M * 4u) {
        return;
    }
    let ai = (lid / 4u) * AV + 2u * (lid % 4u);
    as_hi[ai] = st.ah0;
    as_hi[ai + 1u] = st.ah1;
    as_lo[ai] = st.al0;
    as_lo[ai + 1u] = st.al1;
    let c = lid / 2u;
    let sc = block_scale(st.code, wexp[c]);
    let bi = c * AV + 4u * (lid % 2u);
    put_b8(bi, st.w0, sc);
    put_b8(bi + 2u, st.w1, sc);
}

@compute @workgroup_size(COOP_THREADS)
fn coop_gemm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
             @builtin(subgroup_size) sgs: u32) {
    let lid = lid3.x;
    var r0 = wid.x * TILE_M;
    var r1 = p.m;
    var wbase = 0u;
    if (p.mode == MODE_HEADS) {
        wbase = wid.z * p.head_rows + p.head_row0;
    } else if (p.mode != MODE_LINEAR) {
        if (lid == 0u) {
            tile_wg = tile(wid.x);
        }
        let tl = workgroupUniformLoad(&tile_wg);
        if (tl.live == 0u) {
            return;
        }
        r0 = tl.r0;
        r1 = tl.r1;
        wbase = tl.e * select(p.n, 2u * p.n, p.mode == MODE_GATE_UP) - p.row0;
    }
    for (var i = lid; i < TILE_M; i += COOP_THREADS) {
        let r = r0 + i;
        var a = NONE;
        var o = NONE;
        if (r < r1) {
            o = select(r, r * p.heads + wid.z, p.mode == MODE_HEADS);
            a = select(o, sorted[r] / p.topk, p.mode == MODE_GATE_UP);
        }
        var f = 0.0;
        if (a != NONE) {
            f = a_rf[a];
        }
        arow[i] = a;
        orow[i] = o;
        ras[i] = f;
    }
    // Gate/up: B columns alternate S gate rows and the S up rows of the same outputs, so each
    // subgroup's two column blocks pair up in the epilogue.
    let gated = p.mode == MODE_GATE_UP;
    let ncol = select(BN, BN / 2u, gated);
    let n0 = wid.y * ncol;
    for (var c = lid; c < BN; c += COOP_THREADS) {
        var o = n0 + c;
        var row = wbase + o;
        if (gated) {
            o = n0 + (c / (2u * S)) * S + c % S;
            row = wbase + ((c / S) % 2u) * p.n + o;
        }
        var wr = NONE;
        var emax = 0;
        var f = 0.0;
        if (o < p.n) {
            wr = row;
            emax = i32(w_row_exp[row]);
            f = column_factor(row, emax);
        }
        wrow[c] = wr;
        wexp[c] = emax;
        rowf[c] = f;
    }
    workgroupBarrier();

    let wm = sg / CN;
    let wn = sg % CN;
    var c00: COOP_MAT<f32, C>;
    var c01: COOP_MAT<f32, C>;
    var c10: COOP_MAT<f32, C>;
    var c11: COOP_MAT<f32, C>;
    var st = fetch(lid, 0u);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        put(lid, st);
        workgroupBarrier();
        // The next step's loads are in flight during this step's products.
        if (k0 + BK < p.k) {
            st = fetch(lid, k0 + BK);
        }
        for (var kk = 0u; kk < BK; kk += S) {
            let ar = (wm * 2u * S) * AV + kk / 4u;
            let a0h = coopLoadT<COOP_MAT<f16, A>>(&as_hi[ar], AV);
            let a1h = coopLoadT<COOP_MAT<f16, A>>(&as_hi[ar + S * AV], AV);
            let a0l = coopLoadT<COOP_MAT<f16, A>>(&as_lo[ar], AV);
            let a1l = coopLoadT<COOP_MAT<f16, A>>(&as_lo[ar + S * AV], AV);
            let br = (wn * 2u * S) * AV + kk / 4u;
            let b0 = coopLoad<COOP_MAT<f16, B>>(&bs[br], AV);
            let b1 = coopLoad<COOP_MAT<f16, B>>(&bs[br + S * AV], AV);
            c00 = coopMultiplyAdd(a0h, b0, c00);
            c01 = coopMultiplyAdd(a0h, b1, c01);
            c10 = coopMultiplyAdd(a1h, b0, c10);
            c11 = coopMultiplyAdd(a1h, b1, c11);
            c00 = coopMultiplyAdd(a0l, b0, c00);
            c01 = coopMultiplyAdd(a0l, b1, c01);
            c10 = coopMultiplyAdd(a1l, b0, c10);
            c11 = coopMultiplyAdd(a1l, b1, c11);
        }
        workgroupBarrier();
    }

    let cb = sg * 2u * S * S;
    for (var mi = 0u; mi < 2u; mi++) {
        if (mi == 0u) {
            coopStoreT(c00, &cs[cb], S);
            coopStoreT(c01, &cs[cb + S * S], S);
        } else {
            coopStoreT(c10, &cs[cb], S);
            coopStoreT(c11, &cs[cb + S * S], S);
        }
        workgroupBarrier();
        for (var e = lane; e < S * S; e += sgs) {
            let i = wm * 2u * S + mi * S + e / S;
            let out = orow[i];
            let c0 = wn * 2u * S + e % S; // B column of cs[cb + e]
            let c1 = c0 + S; // of cs[cb + S * S + e]
            if (out != NONE) {
                let v0 = cs[cb + e] * ras[i];
                let v1 = cs[cb + S * S + e] * ras[i];
                if (gated) {
                    let o = n0 + wn * S + e % S;
                    if (o < p.n) {
                        let g = v0 * rowf[c0];
                        let u = v1 * rowf[c1];
                        y[out * p.n + o] = g / (1.0 + exp(-g)) * u;
                    }
                } else {
                    let base = select(out * p.n, out * p.y_stride + p.n_off, p.mode != MODE_DOWN) + n0;
                    if (wrow[c0] != NONE) {
                        y[base + c0] = v0 * rowf[c0];
                    }
                    if (wrow[c1] != NONE) {
                        y[base + c1] = v1 * rowf[c1];
                    }
                }
            }
        }
        workgroupBarrier();
    }
}
