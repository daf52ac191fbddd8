// Mixture of experts. Every (token, slot) pair p = token * k + slot is computed exactly once:
// - `moe_sort` (one workgroup): counts per expert -> offsets -> a permutation of the pairs
//   sorted by expert (pair order kept within an expert), each pair's sorted position, and a
//   table of row tiles (expert, first sorted row, end) for the grouped GEMMs; all on the GPU.
// - `moe_gate_up_tile` / `moe_down_tile`: grouped GEMMs over the tile table (the prefill path);
//   a tile never mixes experts. Gate and up rows are computed together and SiLU-multiplied.
// - `moe_gate_up_gemv` / `moe_down_gemv`: one GEMV per pair (the decode path), no sorting.
// - `moe_combine`: `out[t] = shared[t] + Σ_slot w[t, slot] * y[pos(t, slot)]` in slot order,
//   one thread per output element, so the sum is deterministic (no float atomics).
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

var<workgroup> cnt: array<u32, MOE_MAX_EXPERTS>;
var<workgroup> offs: array<u32, MOE_MAX_EXPERTS>;

@compute @workgroup_size(WG)
fn moe_sort(@builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    for (var e = lid; e < p.n_experts; e += WG) {
        var c = 0u;
        for (var q = 0u; q < p.pairs; q++) {
            c += select(0u, 1u, ids[q] == e);
        }
        cnt[e] = c;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var o = 0u;
        var t = 0u;
        for (var e = 0u; e < p.n_experts; e++) {
            offs[e] = o;
            for (var r = o; r < o + cnt[e]; r += TILE_M) {
                tiles[3u * t] = e;
                tiles[3u * t + 1u] = r;
                tiles[3u * t + 2u] = min(r + TILE_M, o + cnt[e]);
                t++;
            }
            o += cnt[e];
        }
        for (; t < p.max_tiles; t++) {
            tiles[3u * t] = NONE;
        }
    }
    workgroupBarrier();
    for (var e = lid; e < p.n_experts; e += WG) {
        var at = offs[e];
        for (var q = 0u; q < p.pairs; q++) {
            if (ids[q] == e) {
                sorted[at] = q;
                pos[q] = at;
                at++;
            }
        }
    }
}
