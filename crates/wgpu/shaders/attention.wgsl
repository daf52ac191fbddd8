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
// Prefill (many queries) takes `attn_tile` instead: a workgroup per ATTN_TILE_Q queries of a
// head walks the keys in tiles staged in workgroup memory, so a tile of keys (and values) is
// read once for all those queries instead of once per query, and keeps a running (online)
// softmax: max m, sum l and the output rows rescaled as m grows.

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
    tile_k: u32, // attn_tile: keys per tile (power of two, ATTN_TILE_Q * tile_k <= ATTN_THREADS)
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

// ---- attn_tile ---------------------------------------------------------------------------------
// Needs every width, offset and stride a multiple of 4 (16-byte vectors) and dv <= 128 *
// ATTN_TILE_COLS; the host checks. When the values are the keys' first dv entries (MLA: one
// latent cache, `p.vec == 2`) only the keys are staged.
@group(0) @binding(7) var<storage, read> vb4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> q1v: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> q2v: array<vec4<f32>>;

const TQ: u32 = ATTN_TILE_Q;
// Key rows are padded by one vector: at 512 bytes (GQA's 128 floats) every row started on the
// same bank and the 16 keys a warp scores read as a 16-way conflict.
var<workgroup> kvs: array<vec4<f32>, ATTN_TILE_VEC4>; // [tile_k][width / 4 + 1] keys, then [tile_k][dv / 4] values
var<workgroup> tsc: array<f32, ATTN_THREADS>; // [TQ][tile_k] scores, then probabilities
var<workgroup> tm: array<f32, ATTN_TILE_Q>; // running max per query
var<workgroup> tl: array<f32, ATTN_TILE_Q>; // running sum per query
var<workgroup> ta: array<f32, ATTN_TILE_Q>; // this tile's rescale of the output rows

@compute @workgroup_size(ATTN_THREADS)
fn attn_tile(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let h = wid.y;
    let kh = h / p.group;
    let tq0 = wid.x * TQ;
    let nq = min(TQ, p.t_count - tq0);
    let w4 = (p.d1 + p.d2) / 4u;
    let ks = w4 + 1u;
    let a4 = p.d1 / 4u;
    let dv4 = p.dv / 4u;
    let tk = p.tile_k;
    let shared_v = p.vec == 2u;
    let vbase = select(tk * ks, 0u, shared_v);
    let vstride = select(dv4, ks, shared_v);
    let parts = ATTN_THREADS / (TQ * tk);
    if (lid < TQ) {
        tm[lid] = neg_inf();
        tl[lid] = 0.0;
    }
    // Output rows: thread (oq, cg) holds columns 4 (cg + 32 i), i < ATTN_TILE_COLS.
    let oq = lid / 32u;
    let cg = lid % 32u;
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var o2 = vec4<f32>(0.0);
    var o3 = vec4<f32>(0.0);
    // Keys the block's last query sees (queries are t = 0.., keys j <= pos0 + t).
    let kend = p.pos0 + tq0 + nq;
    for (var j0 = 0u; j0 < kend; j0 += tk) {
        for (var e = lid; e < tk * w4; e += ATTN_THREADS) {
            let j = j0 + e / w4;
            var v = vec4<f32>(0.0);
            if (j < kend) {
                v = kb[(j * p.k_row + kh * p.k_head) / 4u + e % w4];
            }
            kvs[(e / w4) * ks + e % w4] = v;
        }
        if (!shared_v) {
            for (var e = lid; e < tk * dv4; e += ATTN_THREADS) {
                let j = j0 + e / dv4;
                var v = vec4<f32>(0.0);
                if (j < kend) {
                    v = vb4[(j * p.v_row + kh * p.v_head) / 4u + e % dv4];
                }
                kvs[vbase + e] = v;
            }
        }
        workgroupBarrier();
        // Scores: `parts` threads per (query, key), interleaved along the key.
        let pair = lid / parts;
        let part = lid % parts;
        let qi = pair / tk;
        var acc = 0.0;
        if (qi < nq) {
            let row = (tq0 + qi) * p.hq + h;
            let kr = (pair % tk) * ks;
            for (var d = part; d < w4; d += parts) {
                var q: vec4<f32>;
                if (d < a4) {
                    q = q1v[row * a4 + d];
                } else {
                    q = q2v[row * (w4 - a4) + d - a4];
                }
                acc += dot(q, kvs[kr + d]);
            }
        }
        red[lid] = acc;
        workgroupBarrier();
        if (lid < TQ * tk) {
            var s = 0.0;
            for (var i = 0u; i < parts; i++) {
                s += red[lid * parts + i];
            }
            let q = lid / tk;
            let visible = q < nq && j0 + lid % tk <= p.pos0 + tq0 + q;
            tsc[lid] = select(neg_inf(), s * p.scale, visible);
        }
        workgroupBarrier();
        if (lid < nq) {
            let m0 = tm[lid];
            var m = m0;
            for (var k = 0u; k < tk; k++) {
                m = max(m, tsc[lid * tk + k]);
            }
            // Key 0 is in the first tile and visible to every query, so m is finite from there on.
            var l = 0.0;
            for (var k = 0u; k < tk; k++) {
                let e = exp(tsc[lid * tk + k] - m);
                tsc[lid * tk + k] = e;
                l += e;
            }
            let a = exp(m0 - m);
            tl[lid] = tl[lid] * a + l;
            tm[lid] = m;
            ta[lid] = a;
        }
        workgroupBarrier();
        if (oq < nq) {
            let a = ta[oq];
            o0 *= a;
            o1 *= a;
            o2 *= a;
            o3 *= a;
            for (var k = 0u; k < tk; k++) {
                let pk = tsc[oq * tk + k];
                let vr = vbase + k * vstride + cg;
                if (cg < dv4) {
                    o0 += pk * kvs[vr];
                }
                if (cg + 32u < dv4) {
                    o1 += pk * kvs[vr + 32u];
                }
                if (cg + 64u < dv4) {
                    o2 += pk * kvs[vr + 64u];
                }
                if (cg + 96u < dv4) {
                    o3 += pk * kvs[vr + 96u];
                }
            }
        }
        workgroupBarrier();
    }
    if (oq < nq) {
        let inv = 1.0 / tl[oq];
        let ob = ((tq0 + oq) * p.hq + h) * p.dv + 4u * cg;
        tile_store(ob, cg, dv4, o0 * inv);
        tile_store(ob + 128u, cg + 32u, dv4, o1 * inv);
        tile_store(ob + 256u, cg + 64u, dv4, o2 * inv);
        tile_store(ob + 384u, cg + 96u, dv4, o3 * inv);
    }
}

fn tile_store(at: u32, c4: u32, dv4: u32, v: vec4<f32>) {
    if (c4 < dv4) {
        out[at] = v.x;
        out[at + 1u] = v.y;
        out[at + 2u] = v.z;
        out[at + 3u] = v.w;
    }
}
