// Causal attention with the keys split into chunks of ATTN_CHUNK positions (split-K), one workgroup per
// (chunk, head, query), then a merge per (head, query). GQA and MLA share it:
// - GQA: q1 = q [T, Hq, D], d2 = 0; keys k [S, Hkv, D], values v [S, Hkv, Dv].
// - MLA (absorbed): q1 = q_lat [T, H, L], q2 = q_rope [T, H, R]; keys and values are rows of
//   the latent cache [S, L + R] (key = whole row, value = its first L entries), shared by heads.
// A chunk writes its max score m, its sum l of exp(s - m) and Σ exp(s - m) v; the merge
// rescales the chunks to the global max, as a single softmax over all positions would.
// The query (d1 + d2 <= ATTN_QMAX) is staged in workgroup memory; ATTN_THREADS / ATTN_CHUNK
// threads score each key, reading it as 16-byte vectors when every key offset and width is a
// multiple of 4 (`p.vec`).

struct P {
    t_base: u32, // first query of this dispatch (queries are dispatched in slices)
    hq: u32,
    group: u32, // query heads per kv head
    d1: u32,
    d2: u32,
    dv: u32,
    pos0: u32,
    scale: f32,
    k_row: u32, // key row stride (elements)
    k_head: u32, // key head stride
    v_row: u32,
    v_head: u32,
    n_chunks: u32,
    t_count: u32,
    vec: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q1: array<f32>;
@group(0) @binding(2) var<storage, read> q2: array<f32>;
@group(0) @binding(3) var<storage, read> kb: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> vb: array<f32>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>; // [t_count, hq, n_chunks, dv + 2]
@group(0) @binding(6) var<storage, read_write> out: array<f32>; // [T, hq, dv]

var<workgroup> sc: array<f32, ATTN_CHUNK>;
var<workgroup> qs: array<f32, ATTN_QMAX>;
var<workgroup> red: array<f32, ATTN_THREADS>;

// Threads of a chunk's workgroup: ATTN_SPLIT per key while scoring, one per value column
// (dv <= ATTN_THREADS per pass) while summing values.
const ATTN_SPLIT: u32 = ATTN_THREADS / ATTN_CHUNK;

fn q_vec(d4: u32) -> vec4<f32> {
    return vec4<f32>(qs[4u * d4], qs[4u * d4 + 1u], qs[4u * d4 + 2u], qs[4u * d4 + 3u]);
}

@compute @workgroup_size(ATTN_THREADS)
fn attn_chunk(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let chunk = wid.x;
    let h = wid.y;
    let tl = wid.z;
    let t = p.t_base + tl;
    let len = p.pos0 + t + 1u;
    let pbase = ((tl * p.hq + h) * p.n_chunks + chunk) * (p.dv + 2u);
    let j0 = chunk * ATTN_CHUNK;
    if (j0 >= len) {
        // Past the causal limit: an empty chunk that the merge skips.
        return;
    }
    let kh = h / p.group;
    let width = p.d1 + p.d2;
    let qa = (t * p.hq + h) * p.d1;
    let qb = (t * p.hq + h) * p.d2;
    for (var d = lid; d < width; d += ATTN_THREADS) {
        qs[d] = select(q2[qb + d - p.d1], q1[qa + d], d < p.d1);
    }
    workgroupBarrier();
    // Scores: ATTN_SPLIT threads per key, interleaved along the key so their loads are adjacent.
    let key = lid / ATTN_SPLIT;
    let sp = lid % ATTN_SPLIT;
    let j = j0 + key;
    var acc = 0.0;
    if (j < len) {
        let kbase = j * p.k_row + kh * p.k_head;
        if (p.vec != 0u) {
            let kv = kbase / 4u;
            for (var d = sp; d < width / 4u; d += ATTN_SPLIT) {
                acc += dot(q_vec(d), kb[kv + d]);
            }
        } else {
            for (var d = sp; d < width; d += ATTN_SPLIT) {
                let i = kbase + d;
                acc += qs[d] * kb[i / 4u][i % 4u];
            }
        }
    }
    red[lid] = acc;
    workgroupBarrier();
    let nvalid = min(ATTN_CHUNK, len - j0);
    if (lid < nvalid) {
        var s = 0.0;
        for (var i = 0u; i < ATTN_SPLIT; i++) {
            s += red[lid * ATTN_SPLIT + i];
        }
        sc[lid] = s * p.scale;
    }
    workgroupBarrier();
    // Max and sum over the chunk's keys in key order (every thread reads the same scores).
    var m = neg_inf();
    for (var i = 0u; i < nvalid; i++) {
        m = max(m, sc[i]);
    }
    workgroupBarrier();
    if (lid < nvalid) {
        sc[lid] = exp(sc[lid] - m);
    }
    workgroupBarrier();
    for (var d = lid; d < p.dv; d += ATTN_THREADS) {
        var o = 0.0;
        for (var i = 0u; i < nvalid; i++) {
            o += sc[i] * vb[(j0 + i) * p.v_row + kh * p.v_head + d];
        }
        part[pbase + d] = o;
    }
    if (lid == 0u) {
        var l = 0.0;
        for (var i = 0u; i < nvalid; i++) {
            l += sc[i];
        }
        part[pbase + p.dv] = m;
        part[pbase + p.dv + 1u] = l;
    }
}

@compute @workgroup_size(ATTN_CHUNK)
fn attn_merge(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let h = wid.y;
    let tl = wid.z;
    let t = p.t_base + tl;
    let len = p.pos0 + t + 1u;
    let live = (len + ATTN_CHUNK - 1u) / ATTN_CHUNK;
    let base = (tl * p.hq + h) * p.n_chunks * (p.dv + 2u);
    var m = neg_inf();
    for (var c = 0u; c < live; c++) {
        m = max(m, part[base + c * (p.dv + 2u) + p.dv]);
    }
    var l = 0.0;
    for (var c = 0u; c < live; c++) {
        let cb = base + c * (p.dv + 2u);
        l += part[cb + p.dv + 1u] * exp(part[cb + p.dv] - m);
    }
    // Workgroup x takes value columns x * ATTN_CHUNK .. + ATTN_CHUNK (spread so a wide value,
    // MLA's 512, is not one workgroup's serial loop).
    let d = wid.x * ATTN_CHUNK + lid;
    if (d < p.dv) {
        var o = 0.0;
        for (var c = 0u; c < live; c++) {
            let cb = base + c * (p.dv + 2u);
            o += part[cb + d] * exp(part[cb + p.dv] - m);
        }
        out[(t * p.hq + h) * p.dv + d] = o / l;
    }
}
