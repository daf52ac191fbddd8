// argmax / top-k per row, one workgroup per row: k passes, each a workgroup-wide search for the
// best entry ranked after the previous pick ("descending value, ties to the lower index";
// NaN ranks last), so no selected set has to be kept.

struct P {
    rows: u32,
    v: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, V]
@group(0) @binding(2) var<storage, read_write> vals: array<f32>; // [rows, k]
@group(0) @binding(3) var<storage, read_write> ids: array<u32>; // [rows, k]

const NO: u32 = 0xffffffffu;
var<workgroup> rv: array<f32, TOPK_WG>;
var<workgroup> ri: array<u32, TOPK_WG>;

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
            if ((pi == NO || ranks_before(pv, pi, v, i)) && (bi == NO || ranks_before(v, i, bv, bi))) {
                bv = v;
                bi = i;
            }
        }
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
        pv = rv[0];
        pi = ri[0];
        workgroupBarrier();
        if (lid == 0u) {
            vals[row * p.k + s] = pv;
            ids[row * p.k + s] = pi;
        }
    }
}
