// `out[i, :] = table[ids[i], :]` for the ids whose row lies in this weight chunk.

struct P {
    n: u32,
    h: u32,
    row0: u32,
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn embedding(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat_wg(wid, nwg) * WG + lid.x;
    if (e >= p.n * p.h) {
        return;
    }
    let id = ids[e / p.h];
    if (id >= p.row0 && id < p.row0 + p.rows) {
        out[e] = w_at(id - p.row0, p.h, e % p.h);
    }
}
