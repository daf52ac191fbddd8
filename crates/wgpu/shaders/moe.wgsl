// Mixture of experts. Every (token, slot) pair p = token * k + slot is computed exactly once:
// - the sort, all on the GPU, over chunks of WG pairs: `moe_count` (a workgroup per chunk)
//   counts each chunk's pairs per expert; `moe_offsets` (one workgroup) turns the counts into
//   expert offsets, each chunk's first sorted row per expert, and a table of row tiles
//   (expert, first sorted row, end) for the grouped GEMMs; `moe_scatter` (a workgroup per
//   chunk) places each pair after the earlier pairs of its expert, so pair order is kept
//   within an expert and the result does not depend on scheduling. Out: a permutation of the
//   pairs sorted by expert and each pair's sorted position.
// - `moe_gate_up_tile` / `moe_down_tile`: grouped GEMMs over the tile table (the prefill path);
//   a tile never mixes experts. Gate and up rows are computed together and SiLU-multiplied.
// - `moe_gate_up_gemv` / `moe_down_gemv`: one GEMV per pair (the decode path), no sorting.
// - `moe_combine` (norm.wgsl, alone or in the next norm's dispatch): `out[t] = shared[t] +
//   Σ_slot w[t, slot] * y[pos(t, slot)]` in slot order, one thread per output element or one
//   workgroup per row, so the sum is deterministic (no float atomics).
// Stacked expert weights may be split into chunks of whole experts; a dispatch covers the
// experts `e_lo..e_hi` whose rows start at `row0` of the stacked matrix.

struct P {
    pairs: u32, // n * k
    k: u32, // slots per token
    h: u32, // hidden size
    inter: u32, // expert intermediate size I
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

const NONE: u32 = 0xffffffffu;

// ---- sort ------------------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> ids: array<u32>; // [pairs]
@group(0) @binding(2) var<storage, read_write> sorted: array<u32>; // [pairs] pair index at each sorted row
@group(0) @binding(3) var<storage, read_write> pos: array<u32>; // [pairs] sorted row of each pair
@group(0) @binding(4) var<storage, read_write> tiles: array<u32>; // [max_tiles, 3] (expert, row, end)
@group(0) @binding(5) var<storage, read_write> chunk_rows: array<u32>; // [chunks, n_experts]: counts, then first rows

var<workgroup> cnt: array<atomic<u32>, MOE_MAX_EXPERTS>;
var<workgroup> offs: array<u32, MOE_MAX_EXPERTS>;
var<workgroup> chunk_ids: array<u32, WG>;

fn chunks() -> u32 {
    return (p.pairs + WG - 1u) / WG;
}

@compute @workgroup_size(WG)
fn moe_count(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let c = flat_wg(wid, nwg);
    for (var e = lid; e < p.n_experts; e += WG) {
        atomicStore(&cnt[e], 0u);
    }
    workgroupBarrier();
    let q = c * WG + lid;
    if (q < p.pairs) {
        atomicAdd(&cnt[ids[q]], 1u);
    }
    workgroupBarrier();
    if (c < chunks()) {
        for (var e = lid; e < p.n_experts; e += WG) {
            chunk_rows[c * p.n_experts + e] = atomicLoad(&cnt[e]);
        }
    }
}

@compute @workgroup_size(WG)
fn moe_offsets(@builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let nc = chunks();
    for (var e = lid; e < p.n_experts; e += WG) {
        var t = 0u;
        for (var c = 0u; c < nc; c++) {
            t += chunk_rows[c * p.n_experts + e];
        }
        atomicStore(&cnt[e], t);
    }
    workgroupBarrier();
    if (lid == 0u) {
        var o = 0u;
        var t = 0u;
        for (var e = 0u; e < p.n_experts; e++) {
            let n = atomicLoad(&cnt[e]);
            offs[e] = o;
            for (var r = o; r < o + n; r += TILE_M) {
                tiles[3u * t] = e;
                tiles[3u * t + 1u] = r;
                tiles[3u * t + 2u] = min(r + TILE_M, o + n);
                t++;
            }
            o += n;
        }
        for (; t < p.max_tiles; t++) {
            tiles[3u * t] = NONE;
        }
    }
    workgroupBarrier();
    for (var e = lid; e < p.n_experts; e += WG) {
        var at = offs[e];
        for (var c = 0u; c < nc; c++) {
            let i = c * p.n_experts + e;
            let n = chunk_rows[i];
            chunk_rows[i] = at;
            at += n;
        }
    }
}

@compute @workgroup_size(WG)
fn moe_scatter(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let c = flat_wg(wid, nwg);
    let q = c * WG + lid;
    var e = NONE;
    if (q < p.pairs) {
        e = ids[q];
    }
    chunk_ids[lid] = e;
    workgroupBarrier();
    if (q < p.pairs) {
        var rank = 0u;
        for (var j = 0u; j < lid; j++) {
            rank += select(0u, 1u, chunk_ids[j] == e);
        }
        let at = chunk_rows[c * p.n_experts + e] + rank;
        sorted[at] = q;
        pos[q] = at;
    }
}
