// 2-D strided copy `dst[dst_off + i*dst_stride + j] = src[src_off + i*src_stride + j]` for
// i < rows, j < cols, in elements. It implements slice_rows, slice_cols, concat_rows and
// write_rows for every dtype: `copy32` for 4-byte elements, `copy16` for bf16, where each thread
// owns one destination word and keeps the half that lies outside the copied region.

struct P {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_stride: u32,
    dst_off: u32,
    dst_stride: u32,
    words_per_row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;


@compute @workgroup_size(WG)
fn copy32(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat_wg(wid, nwg) * WG + lid.x;
    if (e < p.rows * p.cols) {
        let i = e / p.cols;
        let j = e % p.cols;
        dst[p.dst_off + i * p.dst_stride + j] = src[p.src_off + i * p.src_stride + j];
    }
}

fn src16(e: u32) -> u32 {
    return (src[e / 2u] >> (16u * (e & 1u))) & 0xffffu;
}

@compute @workgroup_size(WG)
fn copy16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_wg(wid, nwg) * WG + lid.x;
    if (t >= p.rows * p.words_per_row || p.cols == 0u) {
        return;
    }
    let i = t / p.words_per_row;
    let d0 = p.dst_off + i * p.dst_stride;
    let w = d0 / 2u + t % p.words_per_row;
    if (w > (d0 + p.cols - 1u) / 2u) {
        return;
    }
    var word = dst[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e >= d0 && e < d0 + p.cols) {
            let v = src16(p.src_off + i * p.src_stride + (e - d0));
            word = (word & ~(0xffffu << (16u * h))) | (v << (16u * h));
        }
    }
    dst[w] = word;
}
