// Grouped expert GEMMs over the tile table of `moe_sort` (see moe.wgsl for the scheme).
// Tiles are TILE_M sorted rows x NT columns (`N_TILE`, from `MoePath::Prefill`), K in steps of KT,
// with vec4 accumulators, as in gemm.wgsl.

struct P {
    pairs: u32,
    k: u32,
    h: u32,
    inter: u32,
    e_lo: u32,
    e_hi: u32,
    row0: u32,
    n_experts: u32,
    max_tiles: u32,
    has_shared: u32,
    identity_pos: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>; // gate_up: tokens [n, H]; down: act [pairs, I]
@group(0) @binding(2) var<storage, read> sorted: array<u32>; // [pairs]
@group(0) @binding(3) var<storage, read> tiles: array<u32>; // [max_tiles, 3]
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // gate_up: act [pairs, I]; down: [pairs, H]

const NT: u32 = N_TILEu;
const KT: u32 = 32u;
const TN: u32 = NT / 16u;
var<workgroup> xs: array<vec4<f32>, TILE_M * KT / 4u>; // [KT][TILE_M], 4 rows a vector
var<workgroup> wg: array<vec4<f32>, KT * NT / 4u>; // [KT][NT] gate rows (down: the only weight tile), 4 columns a vector
var<workgroup> wu: array<vec4<f32>, KT * NT / 4u>; // [KT][NT] up rows

struct Tile {
    e: u32,
    r0: u32,
    r1: u32,
    live: bool,
}

fn tile(t: u32) -> Tile {
    if (t >= p.max_tiles) {
        return Tile(0u, 0u, 0u, false);
    }
    let e = tiles[3u * t];
    if (e == 0xffffffffu || e < p.e_lo || e >= p.e_hi) {
        return Tile(0u, 0u, 0u, false);
    }
    return Tile(e, tiles[3u * t + 1u], tiles[3u * t + 2u], true);
}

fn load_weights(dst_gate: bool, row: u32, valid: bool, kdim: u32, k0: u32, nn: u32, kk: u32) {
    var w: array<f32, 8>;
    if (valid) {
        w = w_get8(row, kdim, k0 + kk);
    }
    // Unrolled: a per-thread array indexed in a loop goes to local memory.
    if (dst_gate) {
        wg[((kk + 0u) * NT + nn) / 4u][nn % 4u] = w[0];
        wg[((kk + 1u) * NT + nn) / 4u][nn % 4u] = w[1];
        wg[((kk + 2u) * NT + nn) / 4u][nn % 4u] = w[2];
        wg[((kk + 3u) * NT + nn) / 4u][nn % 4u] = w[3];
        wg[((kk + 4u) * NT + nn) / 4u][nn % 4u] = w[4];
        wg[((kk + 5u) * NT + nn) / 4u][nn % 4u] = w[5];
        wg[((kk + 6u) * NT + nn) / 4u][nn % 4u] = w[6];
        wg[((kk + 7u) * NT + nn) / 4u][nn % 4u] = w[7];
    } else {
        wu[((kk + 0u) * NT + nn) / 4u][nn % 4u] = w[0];
        wu[((kk + 1u) * NT + nn) / 4u][nn % 4u] = w[1];
        wu[((kk + 2u) * NT + nn) / 4u][nn % 4u] = w[2];
        wu[((kk + 3u) * NT + nn) / 4u][nn % 4u] = w[3];
        wu[((kk + 4u) * NT + nn) / 4u][nn % 4u] = w[4];
        wu[((kk + 5u) * NT + nn) / 4u][nn % 4u] = w[5];
        wu[((kk + 6u) * NT + nn) / 4u][nn % 4u] = w[6];
        wu[((kk + 7u) * NT + nn) / 4u][nn % 4u] = w[7];
    }
}

// Thread tx's TN columns of a weight-tile vector (its 4 columns, or the half of them for TN = 2;
// the rest 0).
fn cols(v: vec4<f32>, tx: u32) -> vec4<f32> {
    if (TN == 4u) {
        return v;
    }
    return select(vec4<f32>(v.zw, 0.0, 0.0), vec4<f32>(v.xy, 0.0, 0.0), tx % 2u == 0u);
}

@compute @workgroup_size(WG)
fn moe_gate_up_tile(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tl = tile(wid.x);
    if (!tl.live) {
        return;
    }
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let n0 = wid.y * NT;
    let wbase = tl.e * 2u * p.inter - p.row0;
    var g0 = vec4<f32>(0.0);
    var g1 = vec4<f32>(0.0);
    var g2 = vec4<f32>(0.0);
    var g3 = vec4<f32>(0.0);
    var u0 = vec4<f32>(0.0);
    var u1 = vec4<f32>(0.0);
    var u2 = vec4<f32>(0.0);
    var u3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.h; k0 += KT) {
        for (var e = lid; e < TILE_M * KT; e += WG) {
            let mm = e / KT;
            let kk = e % KT;
            let r = tl.r0 + mm;
            var v = 0.0;
            if (r < tl.r1 && k0 + kk < p.h) {
                v = x[(sorted[r] / p.k) * p.h + k0 + kk];
            }
            xs[(kk * TILE_M + mm) / 4u][mm % 4u] = v;
        }
        for (var e = lid; e < NT * (KT / 8u); e += WG) {
            let nn = e / (KT / 8u);
            let kk = (e % (KT / 8u)) * 8u;
            let valid = n0 + nn < p.inter;
            load_weights(true, wbase + n0 + nn, valid, p.h, k0, nn, kk);
            load_weights(false, wbase + p.inter + n0 + nn, valid, p.h, k0, nn, kk);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let a = xs[kk * (TILE_M / 4u) + ty];
            let bg = cols(wg[kk * (NT / 4u) + tx * TN / 4u], tx);
            let bu = cols(wu[kk * (NT / 4u) + tx * TN / 4u], tx);
            g0 += a.x * bg;
            g1 += a.y * bg;
            g2 += a.z * bg;
            g3 += a.w * bg;
            u0 += a.x * bu;
            u1 += a.y * bu;
            u2 += a.z * bu;
            u3 += a.w * bu;
        }
        workgroupBarrier();
    }
    let n = n0 + TN * tx;
    gate_up_store(tl, 4u * ty, n, g0, u0);
    gate_up_store(tl, 4u * ty + 1u, n, g1, u1);
    gate_up_store(tl, 4u * ty + 2u, n, g2, u2);
    gate_up_store(tl, 4u * ty + 3u, n, g3, u3);
}

fn gate_up_store(tl: Tile, i: u32, n: u32, g: vec4<f32>, u: vec4<f32>) {
    let r = tl.r0 + i;
    for (var j = 0u; j < TN; j++) {
        if (r < tl.r1 && n + j < p.inter) {
            out[r * p.inter + n + j] = g[j] / (1.0 + exp(-g[j])) * u[j];
        }
    }
}

@compute @workgroup_size(WG)
fn moe_down_tile(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tl = tile(wid.x);
    if (!tl.live) {
        return;
    }
    let lid = lid3.x;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let n0 = wid.y * NT;
    let wbase = tl.e * p.h - p.row0;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.inter; k0 += KT) {
        for (var e = lid; e < TILE_M * KT; e += WG) {
            let mm = e / KT;
            let kk = e % KT;
            let r = tl.r0 + mm;
            var v = 0.0;
            if (r < tl.r1 && k0 + kk < p.inter) {
                v = x[r * p.inter + k0 + kk];
            }
            xs[(kk * TILE_M + mm) / 4u][mm % 4u] = v;
        }
        for (var e = lid; e < NT * (KT / 8u); e += WG) {
            let nn = e / (KT / 8u);
            let kk = (e % (KT / 8u)) * 8u;
            load_weights(true, wbase + n0 + nn, n0 + nn < p.h, p.inter, k0, nn, kk);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let a = xs[kk * (TILE_M / 4u) + ty];
            let b = cols(wg[kk * (NT / 4u) + tx * TN / 4u], tx);
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    let n = n0 + TN * tx;
    down_store(tl, 4u * ty, n, acc0);
    down_store(tl, 4u * ty + 1u, n, acc1);
    down_store(tl, 4u * ty + 2u, n, acc2);
    down_store(tl, 4u * ty + 3u, n, acc3);
}

fn down_store(tl: Tile, i: u32, n: u32, v: vec4<f32>) {
    let r = tl.r0 + i;
    for (var j = 0u; j < TN; j++) {
        if (r < tl.r1 && n + j < p.h) {
            out[r * p.h + n + j] = v[j];
        }
    }
}
