// 2-D strided copy `dst[dst_off + i*dst_stride + j] = src[src_off + i*src_stride + j]` for
// i < rows, j < cols, in elements. It implements slice_rows, slice_cols, concat_rows and
// write_rows for every dtype: `copy32` for 4-byte elements, `copy16` for bf16, where each thread
// owns one destination word and keeps the half that lies outside the copied region. `copy32`
// runs a second copy (src1 -> dst1, `p.second`) after the first in the same dispatch: a layer's
// two cache writes (`write_rows_many`); a single copy binds its own buffers there, with no rows.

// Uniform struct members start on 16 bytes: each copy takes 8 words.
struct Copy2d {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_stride: u32,
    dst_off: u32,
    dst_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

struct P {
    first: Copy2d,
    second: Copy2d,
    words_per_row: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@group(0) @binding(3) var<storage, read> src1: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst1: array<u32>;

@compute @workgroup_size(WG)
fn copy32(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat_wg(wid, nwg) * WG + lid.x;
    let n0 = p.first.rows * p.first.cols;
    if (e < n0) {
        let c = p.first;
        let i = e / c.cols;
        let j = e % c.cols;
        dst[c.dst_off + i * c.dst_stride + j] = src[c.src_off + i * c.src_stride + j];
    } else if (e - n0 < p.second.rows * p.second.cols) {
        let c = p.second;
        let i = (e - n0) / c.cols;
        let j = (e - n0) % c.cols;
        dst1[c.dst_off + i * c.dst_stride + j] = src1[c.src_off + i * c.src_stride + j];
    }
}

fn src16(e: u32) -> u32 {
    return (src[e / 2u] >> (16u * (e & 1u))) & 0xffffu;
}

@compute @workgroup_size(WG)
fn copy16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_wg(wid, nwg) * WG + lid.x;
    let c = p.first;
    if (t >= c.rows * p.words_per_row || c.cols == 0u) {
        return;
    }
    let i = t / p.words_per_row;
    let d0 = c.dst_off + i * c.dst_stride;
    let w = d0 / 2u + t % p.words_per_row;
    if (w > (d0 + c.cols - 1u) / 2u) {
        return;
    }
    var word = dst[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e >= d0 && e < d0 + c.cols) {
            let v = src16(c.src_off + i * c.src_stride + (e - d0));
            word = (word & ~(0xffffu << (16u * h))) | (v << (16u * h));
        }
    }
    dst[w] = word;
}
