// Elementwise ops over flat f32 / packed-bf16 buffers. One thread per output element (per
// output word for bf16 outputs, so no two threads write the same u32).

struct P {
    n: u32,
    inner: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> a_u: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_u: array<u32>;


@compute @workgroup_size(WG)
fn add(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i < p.n) {
        out[i] = a[i] + b[i];
    }
}

// p.n = output elements, p.inner = I (input rows are [gate I | up I]).
@compute @workgroup_size(WG)
fn silu_mul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i < p.n) {
        let r = i / p.inner;
        let j = i % p.inner;
        let g = a[r * 2u * p.inner + j];
        out[i] = g / (1.0 + exp(-g)) * a[r * 2u * p.inner + p.inner + j];
    }
}

// In place: out[i] rounded to bf16 (and read back as f32), i < p.n. The MoE's intermediate with
// bf16 x (Backend::moe rounds it).
@compute @workgroup_size(WG)
fn round_bf16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i < p.n) {
        out[i] = bf16_to_f32(f32_to_bf16(out[i]));
    }
}

// f32 -> bf16: thread per output word (elements 2w, 2w+1); p.n = elements.
@compute @workgroup_size(WG)
fn to_bf16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = flat_wg(wid, nwg) * WG + lid.x;
    if (2u * w < p.n) {
        var v = f32_to_bf16(a[2u * w]);
        if (2u * w + 1u < p.n) {
            v = v | (f32_to_bf16(a[2u * w + 1u]) << 16u);
        }
        out_u[w] = v;
    }
}

@compute @workgroup_size(WG)
fn from_bf16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i < p.n) {
        out[i] = bf16_to_f32(a_u[i / 2u] >> (16u * (i & 1u)));
    }
}
