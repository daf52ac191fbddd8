// `out[t, c] = shared[t, c] + Σ_slot w[t, slot] * y[pos[t*k + slot], c]`, slots in order, one
// thread per output element (deterministic; see moe.wgsl).

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
@group(0) @binding(1) var<storage, read> y: array<f32>; // [pairs, H] expert outputs (sorted rows or pair order)
@group(0) @binding(2) var<storage, read> pos: array<u32>; // [pairs] row of each pair in y
@group(0) @binding(3) var<storage, read> wts: array<f32>; // [n, k]
@group(0) @binding(4) var<storage, read> shared_out: array<f32>; // [n, H] (unused without a shared expert)
@group(0) @binding(5) var<storage, read_write> out: array<f32>; // [n, H]

@compute @workgroup_size(WG)
fn moe_combine(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    let n = p.pairs / p.k;
    if (i >= n * p.h) {
        return;
    }
    let t = i / p.h;
    let c = i % p.h;
    var o = 0.0;
    if (p.has_shared != 0u) {
        o = shared_out[i];
    }
    for (var s = 0u; s < p.k; s++) {
        let q = t * p.k + s;
        var row = q;
        if (p.identity_pos == 0u) {
            row = pos[q];
        }
        o += wts[q] * y[row * p.h + c];
    }
    out[i] = o;
}
