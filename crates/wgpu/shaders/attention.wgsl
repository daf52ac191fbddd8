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
// Prefill (many queries) takes `attn_tile` / `attn_tile_wide` instead (below): key tiles staged
// once for a block of up to 64 (query, head) rows, with an online softmax.

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
    // Values: eight keys' loads issued before their products (one at a time, each waited a
    // full memory latency), summed in key order as before.
    for (var d = lid; d < p.dv; d += ATTN_THREADS) {
        let vbase = j0 * p.v_row + kh * p.v_head + d;
        let vr = p.v_row;
        var o = 0.0;
        var i = 0u;
        for (; i + 8u <= nvalid; i += 8u) {
            let r = vbase + i * vr;
            let v0 = vb[r];
            let v1 = vb[r + vr];
            let v2 = vb[r + 2u * vr];
            let v3 = vb[r + 3u * vr];
            let v4 = vb[r + 4u * vr];
            let v5 = vb[r + 5u * vr];
            let v6 = vb[r + 6u * vr];
            let v7 = vb[r + 7u * vr];
            o += sc[i] * v0;
            o += sc[i + 1u] * v1;
            o += sc[i + 2u] * v2;
            o += sc[i + 3u] * v3;
            o += sc[i + 4u] * v4;
            o += sc[i + 5u] * v5;
            o += sc[i + 6u] * v6;
            o += sc[i + 7u] * v7;
        }
        for (; i < nvalid; i++) {
            o += sc[i] * vb[vbase + i * vr];
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

// ---- attn_tile, attn_tile_wide --------------------------------------------------------------
// Prefill, FlashAttention-style. A workgroup takes a block of nq (query, head) rows of one kv
// head: rows run over the queries with the kv head's query heads fastest (GQA: the heads of its
// group; MLA: every head), so one staged key tile serves all nq rows and the causal limit moves
// slowly across a block. It walks the keys in tiles of kt with an online softmax: running max m
// and sum l per row, the output rows rescaled as m grows.
// - `attn_tile`: dv <= 4 ATTN_TILE_DV4 (128), nq = 64, kt = 32; `attn_tile_wide`: dv <= 4
//   ATTN_WIDE_DV4 (MLA's 512), nq = 32, kt = 64.
// - Scores: queries and keys staged in chunks of FT_DC vectors (any key width; the next chunk
//   is loaded into registers during the current one's products); each thread 2 rows x 4 keys
//   (keys sk + ks j, ks = kt / 4), so one key vector feeds two rows.
// - Values: staged in sub-tiles of FT_UNION / max dv4 keys; each thread holds 8 rows of one
//   value vector (attn_tile) or of two (attn_tile_wide).
// Needs every width, offset and stride a multiple of 4 (16-byte vectors); the host checks. When
// the values are the keys' first dv entries (MLA: one latent cache, `p.vec == 2`) they are read
// from the key buffer.
@group(0) @binding(7) var<storage, read> vb4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> q1v: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> q2v: array<vec4<f32>>;

const FT_DC: u32 = ATTN_FT_DC;
// Row stride (vectors) of staged chunks: odd, so the 8 keys a subgroup reads at once sit on
// distinct banks.
const FT_S: u32 = FT_DC + 1u;
// Rows (or keys) one staging pass covers: FT_DC threads per row.
const FT_PASS: u32 = ATTN_THREADS / FT_DC;
const FT_UNION: u32 = ATTN_FT_UNION;
var<workgroup> fu: array<vec4<f32>, FT_UNION>;
// [rows][kt / 4 + 1] scores, then probabilities (64 x 9 or 32 x 17 vectors).
var<workgroup> fs: array<vec4<f32>, ATTN_TILE_ROWS * (ATTN_TILE_KEYS / 4u + 1u)>;
var<workgroup> fm: array<f32, ATTN_TILE_ROWS * 2u>; // running max per row, two slots (tile parity)
var<workgroup> fl: array<f32, ATTN_TILE_ROWS>; // running sum per row
var<workgroup> fa: array<f32, ATTN_TILE_ROWS>; // this tile's rescale per row

// One kernel's tiling: rows per block, keys per tile.
struct FtShape {
    nq: u32,
    kt: u32,
}

// Row stride (vectors) of the score tile.
fn ft_ps(f: FtShape) -> u32 {
    return f.kt / 4u + 1u;
}

// Row of q / out (layout [T, hq, ...]) of block row r of kv head kh: query r / group, head
// kh * group + r % group.
fn ft_row(r: u32, kh: u32) -> u32 {
    return (r / p.group) * p.hq + kh * p.group + r % p.group;
}

// Query vector d of block row r (zero past the rows or the width).
fn ft_q(r: u32, d: u32, nrows: u32, kh: u32) -> vec4<f32> {
    let w4 = (p.d1 + p.d2) / 4u;
    let a4 = p.d1 / 4u;
    if (r >= nrows || d >= w4) {
        return vec4<f32>(0.0);
    }
    let row = ft_row(r, kh);
    if (d < a4) {
        return q1v[row * a4 + d];
    }
    return q2v[row * (w4 - a4) + d - a4];
}

fn ft_k(j: u32, d: u32, kend: u32, kh: u32) -> vec4<f32> {
    if (j >= kend || d >= (p.d1 + p.d2) / 4u) {
        return vec4<f32>(0.0);
    }
    return kb[(j * p.k_row + kh * p.k_head) / 4u + d];
}

// A thread's share of one staged value sub-tile (count keys from jb, at fu[key * dv4 + c]):
// vectors lid + ATTN_THREADS i, loaded into registers before they are stored, so the loads are
// in flight while the workgroup finishes what it is doing.
struct FtV {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
}

fn ft_v(e: u32, jb: u32, count: u32, kend: u32, kh: u32) -> vec4<f32> {
    let dv4 = p.dv / 4u;
    let j = jb + e / dv4;
    if (e >= count * dv4 || j >= kend) {
        return vec4<f32>(0.0);
    }
    if (p.vec == 2u) {
        return kb[(j * p.k_row + kh * p.k_head) / 4u + e % dv4];
    }
    return vb4[(j * p.v_row + kh * p.v_head) / 4u + e % dv4];
}

fn ft_load_v(lid: u32, jb: u32, count: u32, kend: u32, kh: u32) -> FtV {
    return FtV(
        ft_v(lid, jb, count, kend, kh),
        ft_v(lid + ATTN_THREADS, jb, count, kend, kh),
        ft_v(lid + 2u * ATTN_THREADS, jb, count, kend, kh),
        ft_v(lid + 3u * ATTN_THREADS, jb, count, kend, kh),
    );
}

fn ft_store_v(lid: u32, v: FtV) {
    fu[lid] = v.v0;
    fu[lid + ATTN_THREADS] = v.v1;
    fu[lid + 2u * ATTN_THREADS] = v.v2;
    fu[lid + 3u * ATTN_THREADS] = v.v3;
}

// A thread's share of query / key chunk c: vector lid % FT_DC of block rows i and i + FT_PASS
// and of keys j0 + i and j0 + i + FT_PASS (i = lid / FT_DC; the second ones where nq or kt
// reach them). Keys are staged after the block's nq query rows.
struct FtQK {
    q0: vec4<f32>,
    q1: vec4<f32>,
    k0: vec4<f32>,
    k1: vec4<f32>,
}

fn ft_load_qk(lid: u32, f: FtShape, c: u32, b: FtBlock, j0: u32, kh: u32) -> FtQK {
    let d = c * FT_DC + lid % FT_DC;
    let i = lid / FT_DC;
    var v = FtQK(ft_q(b.r0 + i, d, b.nrows, kh), vec4<f32>(0.0), ft_k(j0 + i, d, b.kend, kh), vec4<f32>(0.0));
    if (i + FT_PASS < f.nq) {
        v.q1 = ft_q(b.r0 + i + FT_PASS, d, b.nrows, kh);
    }
    if (i + FT_PASS < f.kt) {
        v.k1 = ft_k(j0 + i + FT_PASS, d, b.kend, kh);
    }
    return v;
}

fn ft_store_qk(lid: u32, f: FtShape, v: FtQK) {
    let i = lid / FT_DC;
    let d = lid % FT_DC;
    let koff = f.nq * FT_S;
    fu[i * FT_S + d] = v.q0;
    fu[koff + i * FT_S + d] = v.k0;
    if (i + FT_PASS < f.nq) {
        fu[(i + FT_PASS) * FT_S + d] = v.q1;
    }
    if (i + FT_PASS < f.kt) {
        fu[koff + (i + FT_PASS) * FT_S + d] = v.k1;
    }
}

// Scores of a thread (rows sr and sr + ATTN_THREADS / ks, keys sk + ks j) for one key tile. `next`
// holds chunk 0 of this tile on entry and chunk 0 of the next tile on return.
struct FtScores {
    s0: vec4<f32>,
    s1: vec4<f32>,
    next: FtQK,
}

fn ft_tile_scores(lid: u32, f: FtShape, b: FtBlock, j0: u32, kh: u32, first: FtQK) -> FtScores {
    let nch = ((p.d1 + p.d2) / 4u + FT_DC - 1u) / FT_DC;
    let ks = f.kt / 4u;
    let ra = lid / ks;
    let rb = ra + ATTN_THREADS / ks;
    let kr0 = f.nq * FT_S + (lid % ks) * FT_S;
    var st = first;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    for (var c = 0u; c < nch; c++) {
        workgroupBarrier();
        ft_store_qk(lid, f, st);
        workgroupBarrier();
        if (c + 1u < nch) {
            st = ft_load_qk(lid, f, c + 1u, b, j0, kh);
        } else {
            st = ft_load_qk(lid, f, 0u, b, j0 + f.kt, kh);
        }
        for (var d = 0u; d < FT_DC; d++) {
            let qa = fu[ra * FT_S + d];
            let qb = fu[rb * FT_S + d];
            let kr = kr0 + d;
            let k0 = fu[kr];
            let k1 = fu[kr + ks * FT_S];
            let k2 = fu[kr + 2u * ks * FT_S];
            let k3 = fu[kr + 3u * ks * FT_S];
            s0 += vec4<f32>(dot(qa, k0), dot(qa, k1), dot(qa, k2), dot(qa, k3));
            s1 += vec4<f32>(dot(qb, k0), dot(qb, k1), dot(qb, k2), dot(qb, k3));
        }
    }
    return FtScores(s0, s1, st);
}

// Scaled scores of block row lr (global row r0 + lr) for keys j0 + sk + ks j, -inf past the
// row's causal limit.
fn ft_row_scores(f: FtShape, b: FtBlock, lr: u32, sk: u32, j0: u32, s: vec4<f32>) {
    let ks = f.kt / 4u;
    let last = p.pos0 + min(b.r0 + lr, b.nrows - 1u) / p.group;
    for (var j = 0u; j < 4u; j++) {
        let key = sk + ks * j;
        fs[lr * ft_ps(f) + key / 4u][key % 4u] = select(neg_inf(), s[j] * p.scale, j0 + key <= last);
    }
}

fn ft_scores(lid: u32, f: FtShape, b: FtBlock, j0: u32, s: FtScores) {
    let ks = f.kt / 4u;
    ft_row_scores(f, b, lid / ks, lid % ks, j0, s.s0);
    ft_row_scores(f, b, lid / ks + ATTN_THREADS / ks, lid % ks, j0, s.s1);
}

// Online softmax over the score tile, ATTN_THREADS / nq threads per row (every one reads the
// row's maximum, each turns two vectors of scores into probabilities). Value sub-tile 0 (loaded
// by the caller) is staged between the two halves. Ends at a barrier: probabilities, fa and fl
// are ready.
fn ft_softmax(lid: u32, f: FtShape, slot: u32, v: FtV) {
    let tpr = ATTN_THREADS / f.nq;
    let row = lid / tpr;
    let ps = ft_ps(f);
    let at = row * ps + (lid % tpr) * 2u;
    let m_old = fm[(slot ^ 1u) * ATTN_TILE_ROWS + row];
    var mx = fs[row * ps];
    for (var i = 1u; i < f.kt / 4u; i++) {
        mx = max(mx, fs[row * ps + i]);
    }
    let m = max(m_old, max(max(mx.x, mx.y), max(mx.z, mx.w)));
    let pa = exp(fs[at] - m);
    let pb = exp(fs[at + 1u] - m);
    red[lid] = dot(pa + pb, vec4<f32>(1.0));
    if (lid % tpr == 0u) {
        fm[slot * ATTN_TILE_ROWS + row] = m;
        fa[row] = exp(m_old - m);
    }
    workgroupBarrier();
    ft_store_v(lid, v);
    fs[at] = pa;
    fs[at + 1u] = pb;
    if (lid % tpr == 0u) {
        var l = 0.0;
        for (var i = 0u; i < tpr; i++) {
            l += red[row * tpr + i];
        }
        fl[row] = fl[row] * fa[row] + l;
    }
    workgroupBarrier();
}

// o + Σ_k p[row, 4 kq + k] v_k over four staged keys.
fn ft_pv(o: vec4<f32>, ps: u32, row: u32, kq: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {
    let pr = fs[row * ps + kq];
    return o + pr.x * v0 + pr.y * v1 + pr.z * v2 + pr.w * v3;
}

// Block geometry: rows r0.. (block x, longest first: late queries see the most keys) and the keys
// its last row sees; also sets the first tile's softmax state.
struct FtBlock {
    r0: u32,
    nrows: u32,
    kend: u32,
}

fn ft_block(lid: u32, bx: u32, nq: u32) -> FtBlock {
    let nrows = p.t_count * p.group;
    let nblk = (nrows + nq - 1u) / nq;
    let r0 = (nblk - 1u - bx) * nq;
    if (lid < nq) {
        fm[ATTN_TILE_ROWS + lid] = neg_inf();
        fl[lid] = 0.0;
    }
    return FtBlock(r0, nrows, p.pos0 + (min(r0 + nq, nrows) - 1u) / p.group + 1u);
}

fn ft_store(b: FtBlock, kh: u32, lr: u32, c4: u32, o: vec4<f32>) {
    let r = b.r0 + lr;
    if (r < b.nrows) {
        let row = ft_row(r, kh);
        tile_store(row * p.dv + 4u * c4, c4, p.dv / 4u, o / fl[lr]);
    }
}

// Eight output rows of one value vector: rows r0 + rs i.
struct FtAcc {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
    a4: vec4<f32>,
    a5: vec4<f32>,
    a6: vec4<f32>,
    a7: vec4<f32>,
}

fn ft_acc_zero() -> FtAcc {
    let z = vec4<f32>(0.0);
    return FtAcc(z, z, z, z, z, z, z, z);
}

// The rows rescaled by this tile's max update (fa).
fn ft_acc_rescale(a: FtAcc, r0: u32, rs: u32) -> FtAcc {
    return FtAcc(a.a0 * fa[r0], a.a1 * fa[r0 + rs], a.a2 * fa[r0 + 2u * rs], a.a3 * fa[r0 + 3u * rs],
                 a.a4 * fa[r0 + 4u * rs], a.a5 * fa[r0 + 5u * rs], a.a6 * fa[r0 + 6u * rs], a.a7 * fa[r0 + 7u * rs]);
}

// Adds four staged keys' values (v0..v3 at probability vector kq) to every row.
fn ft_acc_pv(a: FtAcc, ps: u32, r0: u32, rs: u32, kq: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> FtAcc {
    return FtAcc(
        ft_pv(a.a0, ps, r0, kq, v0, v1, v2, v3),
        ft_pv(a.a1, ps, r0 + rs, kq, v0, v1, v2, v3),
        ft_pv(a.a2, ps, r0 + 2u * rs, kq, v0, v1, v2, v3),
        ft_pv(a.a3, ps, r0 + 3u * rs, kq, v0, v1, v2, v3),
        ft_pv(a.a4, ps, r0 + 4u * rs, kq, v0, v1, v2, v3),
        ft_pv(a.a5, ps, r0 + 5u * rs, kq, v0, v1, v2, v3),
        ft_pv(a.a6, ps, r0 + 6u * rs, kq, v0, v1, v2, v3),
        ft_pv(a.a7, ps, r0 + 7u * rs, kq, v0, v1, v2, v3),
    );
}

fn ft_acc_store(b: FtBlock, kh: u32, r0: u32, rs: u32, c4: u32, a: FtAcc) {
    ft_store(b, kh, r0, c4, a.a0);
    ft_store(b, kh, r0 + rs, c4, a.a1);
    ft_store(b, kh, r0 + 2u * rs, c4, a.a2);
    ft_store(b, kh, r0 + 3u * rs, c4, a.a3);
    ft_store(b, kh, r0 + 4u * rs, c4, a.a4);
    ft_store(b, kh, r0 + 5u * rs, c4, a.a5);
    ft_store(b, kh, r0 + 6u * rs, c4, a.a6);
    ft_store(b, kh, r0 + 7u * rs, c4, a.a7);
}

// Four consecutive staged value rows' vector c (value sub-tile layout [key][dv4]).
struct FtV4 {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
}

fn ft_v4(k: u32, dv4: u32, c: u32) -> FtV4 {
    return FtV4(fu[k * dv4 + c], fu[(k + 1u) * dv4 + c], fu[(k + 2u) * dv4 + c], fu[(k + 3u) * dv4 + c]);
}

@compute @workgroup_size(ATTN_THREADS)
fn attn_tile(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let kh = wid.y;
    let f = FtShape(ATTN_TILE_ROWS, ATTN_TILE_KEYS);
    let ps = ft_ps(f);
    let b = ft_block(lid, wid.x, f.nq);
    // Outputs: rows orow + rs i, vector oc.
    let rs = ATTN_THREADS / ATTN_TILE_DV4;
    let orow = lid / ATTN_TILE_DV4;
    let oc = lid % ATTN_TILE_DV4;
    let dv4 = p.dv / 4u;
    var o = ft_acc_zero();
    var slot = 0u;
    var next = ft_load_qk(lid, f, 0u, b, 0u, kh);
    for (var j0 = 0u; j0 < b.kend; j0 += f.kt) {
        let sc = ft_tile_scores(lid, f, b, j0, kh, next);
        next = sc.next;
        let v = ft_load_v(lid, j0, f.kt, b.kend, kh);
        ft_scores(lid, f, b, j0, sc);
        workgroupBarrier();
        ft_softmax(lid, f, slot, v);
        o = ft_acc_rescale(o, orow, rs);
        // Past dv4 the reads stay inside the staging area (oc < 32, keys < 32) and are unused.
        for (var k = 0u; k < f.kt; k += 4u) {
            let v4 = ft_v4(k, dv4, oc);
            o = ft_acc_pv(o, ps, orow, rs, k / 4u, v4.v0, v4.v1, v4.v2, v4.v3);
        }
        slot ^= 1u;
    }
    ft_acc_store(b, kh, orow, rs, oc, o);
}

@compute @workgroup_size(ATTN_THREADS)
fn attn_tile_wide(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let kh = wid.y;
    let f = FtShape(ATTN_WIDE_ROWS, ATTN_WIDE_KEYS);
    let ps = ft_ps(f);
    let b = ft_block(lid, wid.x, f.nq);
    // Outputs: rows orow + rs i, vectors oc (o) and oc + ATTN_WIDE_DV4 / 2 (u).
    let hv = ATTN_WIDE_DV4 / 2u;
    let rs = ATTN_THREADS / hv;
    let orow = lid / hv;
    let oc = lid % hv;
    let dv4 = p.dv / 4u;
    let vk = FT_UNION / ATTN_WIDE_DV4;
    var o = ft_acc_zero();
    var u = ft_acc_zero();
    var slot = 0u;
    var next = ft_load_qk(lid, f, 0u, b, 0u, kh);
    for (var j0 = 0u; j0 < b.kend; j0 += f.kt) {
        let sc = ft_tile_scores(lid, f, b, j0, kh, next);
        next = sc.next;
        let v = ft_load_v(lid, j0, vk, b.kend, kh);
        ft_scores(lid, f, b, j0, sc);
        workgroupBarrier();
        ft_softmax(lid, f, slot, v);
        o = ft_acc_rescale(o, orow, rs);
        u = ft_acc_rescale(u, orow, rs);
        var sub = 0u;
        loop {
            // The next value sub-tile is loaded while this one's products run.
            let more = sub + vk < f.kt;
            var nv: FtV;
            if (more) {
                nv = ft_load_v(lid, j0 + sub + vk, vk, b.kend, kh);
            }
            // Past dv4 the reads stay inside the staging area (oc + hv < 128, keys < vk).
            for (var k = 0u; k < vk; k += 4u) {
                let kq = (sub + k) / 4u;
                let va = ft_v4(k, dv4, oc);
                o = ft_acc_pv(o, ps, orow, rs, kq, va.v0, va.v1, va.v2, va.v3);
                let vb = ft_v4(k, dv4, oc + hv);
                u = ft_acc_pv(u, ps, orow, rs, kq, vb.v0, vb.v1, vb.v2, vb.v3);
            }
            if (!more) {
                break;
            }
            workgroupBarrier();
            ft_store_v(lid, nv);
            workgroupBarrier();
            sub += vk;
        }
        slot ^= 1u;
    }
    ft_acc_store(b, kh, orow, rs, oc, o);
    ft_acc_store(b, kh, orow, rs, oc + hv, u);
}

fn tile_store(at: u32, c4: u32, dv4: u32, v: vec4<f32>) {
    if (c4 < dv4) {
        out[at] = v.x;
        out[at + 1u] = v.y;
        out[at + 2u] = v.z;
        out[at + 3u] = v.w;
    }
}
