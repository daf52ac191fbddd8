// argmax / top-k per row: k passes, each a workgroup-wide search for the best entry ranked
// after the previous pick ("descending value, ties to the lower index"; NaN ranks last), so no
// selected set has to be kept. `top_k`: one workgroup per row. For k up to TOPK_MAX (ops.rs),
// two dispatches: `top_k_part` takes each row in chunks of TOPK_CHUNK (one workgroup each) to
// the chunk's k best in (pk, pi) [rows, parts, k] (NO past a short chunk's end); `top_k_final`
// (one workgroup per row) keeps the k best of the row's parts * k. A single workgroup scanning a
// 151936-wide logits row k times waited on memory most of the time.

struct P {
    rows: u32,
    v: u32,
    k: u32,
    parts: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, V]
@group(0) @binding(2) var<storage, read_write> vals: array<f32>; // [rows, k]
@group(0) @binding(3) var<storage, read_write> ids: array<u32>; // [rows, k]
@group(0) @binding(4) var<storage, read_write> pk: array<f32>; // [rows, parts, k]
@group(0) @binding(5) var<storage, read_write> pi: array<u32>; // [rows, parts, k]

const NO: u32 = 0xffffffffu;
var<workgroup> rv: array<f32, TOPK_WG>;
var<workgroup> ri: array<u32, TOPK_WG>;
const TOPK_CHUNK: u32 = TOPK_WG * TOPK_REG;
var<workgroup> chunk: array<f32, TOPK_CHUNK>;

// Whether (v, i) is a better candidate for this pass than (bv, bi): ranked after the previous
// pick (pv, pi) (pi == NO: the first pass) and before the best so far (bi == NO: none yet).
fn better(pv: f32, pi: u32, v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return (pi == NO || ranks_before(pv, pi, v, i)) && (bi == NO || ranks_before(v, i, bv, bi));
}

// The workgroup's best of each thread's (bv, bi) (bi == NO: none), to every thread.
fn wg_best(lid: u32, bv: f32, bi: u32) -> vec2<u32> {
    rv[lid] = bv;
    ri[lid] = bi;
    workgroupBarrier();
    for (var st = TOPK_WG / 2u; st > 0u; st = st / 2u) {
        if (lid < st) {
            let ov = rv[lid + st];
            let oi = ri[lid + st];
            if (oi != NO && (ri[lid] == NO || ranks_before(ov, oi, rv[lid], ri[lid]))) {
                rv[lid] = ov;
                ri[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    let best = vec2<u32>(bitcast<u32>(rv[0]), ri[0]);
    workgroupBarrier();
    return best;
}

@compute @workgroup_size(TOPK_WG)
fn top_k_part(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (flat >= p.rows * p.parts) {
        return;
    }
    let row = flat / p.parts;
    let i0 = (flat % p.parts) * TOPK_CHUNK;
    for (var c = 0u; c < TOPK_REG; c++) {
        let i = i0 + lid + c * TOPK_WG;
        if (i < p.v) {
            chunk[lid + c * TOPK_WG] = x[row * p.v + i];
        }
    }
    workgroupBarrier();
    var pv = 0.0;
    var pi_ = NO;
    for (var s = 0u; s < p.k; s++) {
        var bv = 0.0;
        var bi = NO;
        for (var c = 0u; c < TOPK_REG; c++) {
            let i = i0 + lid + c * TOPK_WG;
            let v = chunk[lid + c * TOPK_WG];
            if (i < p.v && better(pv, pi_, v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        let best = wg_best(lid, bv, bi);
        pv = bitcast<f32>(best.x);
        pi_ = best.y;
        if (lid == 0u) {
            pk[flat * p.k + s] = pv;
            pi[flat * p.k + s] = pi_;
        }
        if (pi_ == NO) {
            // The chunk is used up: a previous pick nothing ranks after, so later passes find
            // nothing either.
            pv = neg_inf();
            pi_ = p.v;
        }
    }
}

@compute @workgroup_size(TOPK_WG)
fn top_k_final(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let m = p.parts * p.k;
    var pv = 0.0;
    var pi_ = NO;
    for (var s = 0u; s < p.k; s++) {
        var bv = 0.0;
        var bi = NO;
        for (var c = lid; c < m; c += TOPK_WG) {
            let v = pk[row * m + c];
            let i = pi[row * m + c];
            if (i != NO && better(pv, pi_, v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        let best = wg_best(lid, bv, bi);
        pv = bitcast<f32>(best.x);
        pi_ = best.y;
        if (lid == 0u) {
            // NO is left only for a row of fewer than k values, which the host rejects.
            let i = select(pi_, 0u, pi_ == NO);
            ids[row * p.k + s] = i;
            vals[row * p.k + s] = x[row * p.v + i];
        }
    }
}

@compute @workgroup_size(TOPK_WG)
fn top_k(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.v;
    var pv = 0.0;
    var pi = NO;
    for (var s = 0u; s < p.k; s++) {
        var bv = 0.0;
        var bi = NO;
        for (var i = lid; i < p.v; i += TOPK_WG) {
            let v = x[base + i];
            if (better(pv, pi, v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        let best = wg_best(lid, bv, bi);
        pv = bitcast<f32>(best.x);
        pi = best.y;
        if (lid == 0u) {
            vals[row * p.k + s] = pv;
            ids[row * p.k + s] = pi;
        }
    }
}
