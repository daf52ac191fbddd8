// Rotary embedding, one thread per output element; see `fp4moe_ops::Rope` for the pairing.
// The inverse frequencies come from the host (`rope_inv_freq`, the reference's own f32 values)
// so the angle `pos * inv_freq` is the same f32 product the reference takes.

struct P {
    n: u32,
    heads: u32,
    d: u32,
    offset: u32,
    dims: u32,
    interleaved: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;


@compute @workgroup_size(WG)
fn rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat_wg(wid, nwg) * WG + lid.x;
    if (e >= p.n * p.heads * p.d) {
        return;
    }
    let c = e % p.d;
    let t = e / (p.heads * p.d);
    if (c < p.offset || c >= p.offset + p.dims) {
        out[e] = x[e];
        return;
    }
    let rp = rope_pair(c - p.offset, p.dims, p.interleaved != 0u);
    let partner = select(e - rp.dist, e + rp.dist, rp.first);
    out[e] = rope_rotate(x[e], x[partner], rp.first, sincos(f32(pos[t]) * inv_freq[rp.f]));
}
