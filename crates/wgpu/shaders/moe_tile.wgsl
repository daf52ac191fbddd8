// Grouped expert GEMMs over the tile table of `moe_sort` (see moe.wgsl for the scheme).
// Tiles are TILE_M sorted rows x NT columns (`N_TILE`, from `MoePath::Prefill`), K in steps of KT,
// as in gemm.wgsl.

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
const TM: u32 = TILE_M / 16u;
const TN: u32 = NT / 16u;
var<workgroup> xs: array<f32, TILE_M * KT>; // [KT][TILE_M]
var<workgroup> wg: array<f32, KT * NT>; // [KT][NT] gate rows (down: the only weight tile)
var<workgroup> wu: array<f32, KT * NT>; // [KT][NT] up rows

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
    for (var i = 0u; i < 8u; i++) {
        if (dst_gate) {
            wg[(kk + i) * NT + nn] = w[i];
        } else {
            wu[(kk + i) * NT + nn] = w[i];
        }
    }
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
    var ag: array<array<f32, TN>, TM>;
    var au: array<array<f32, TN>, TM>;
    for (var k0 = 0u; k0 < p.h; k0 += KT) {
        for (var e = lid; e < TILE_M * KT; e += WG) {
            let mm = e / KT;
            let kk = e % KT;
            let r = tl.r0 + mm;
            var v = 0.0;
            if (r < tl.r1 && k0 + kk < p.h) {
                v = x[(sorted[r] / p.k) * p.h + k0 + kk];
            }
            xs[kk * TILE_M + mm] = v;
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
            var a: array<f32, TM>;
            for (var i = 0u; i < TM; i++) {
                a[i] = xs[kk * TILE_M + ty + 16u * i];
            }
            for (var j = 0u; j < TN; j++) {
                let bg = wg[kk * NT + tx + 16u * j];
                let bu = wu[kk * NT + tx + 16u * j];
                for (var i = 0u; i < TM; i++) {
                    ag[i][j] += a[i] * bg;
                    au[i][j] += a[i] * bu;
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let r = tl.r0 + ty + 16u * i;
        for (var j = 0u; j < TN; j++) {
            let n = n0 + tx + 16u * j;
            if (r < tl.r1 && n < p.inter) {
                let g = ag[i][j];
                out[r * p.inter + n] = g / (1.0 + exp(-g)) * au[i][j];
            }
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
    var acc: array<array<f32, TN>, TM>;
    for (var k0 = 0u; k0 < p.inter; k0 += KT) {
        for (var e = lid; e < TILE_M * KT; e += WG) {
            let mm = e / KT;
            let kk = e % KT;
            let r = tl.r0 + mm;
            var v = 0.0;
            if (r < tl.r1 && k0 + kk < p.inter) {
                v = x[r * p.inter + k0 + kk];
            }
            xs[kk * TILE_M + mm] = v;
        }
        for (var e = lid; e < NT * (KT / 8u); e += WG) {
            let nn = e / (KT / 8u);
            let kk = (e % (KT / 8u)) * 8u;
            load_weights(true, wbase + n0 + nn, n0 + nn < p.h, p.inter, k0, nn, kk);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            var a: array<f32, TM>;
            for (var i = 0u; i < TM; i++) {
                a[i] = xs[kk * TILE_M + ty + 16u * i];
            }
            for (var j = 0u; j < TN; j++) {
                let b = wg[kk * NT + tx + 16u * j];
                for (var i = 0u; i < TM; i++) {
                    acc[i][j] += a[i] * b;
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let r = tl.r0 + ty + 16u * i;
        for (var j = 0u; j < TN; j++) {
            let n = n0 + tx + 16u * j;
            if (r < tl.r1 && n < p.h) {
                out[r * p.h + n] = acc[i][j];
            }
        }
    }
}
