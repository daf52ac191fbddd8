// Routers, one workgroup per token: each thread scores the experts lid, lid + WG, ...; the
// softmax max and sum are workgroup reductions. The top k come from ranks: an expert's rank in
// the order "descending value, ties to the lower id" (`ranks_before`) is the number of experts
// ranked before it, counted by its thread over the scores staged in workgroup memory (one pass
// and one barrier; k sequential picks took k reductions of log2(WG) barriers each).

struct P {
    n: u32,
    e: u32,
    k: u32,
    renormalize: u32,
    n_group: u32,
    topk_group: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> logits: array<f32>; // [n, E]
@group(0) @binding(2) var<storage, read> bias: array<f32>; // [E]
@group(0) @binding(3) var<storage, read_write> ids: array<u32>; // [n, k]
@group(0) @binding(4) var<storage, read_write> wts: array<f32>; // [n, k]

const NONE: u32 = 0xffffffffu;

struct Best {
    v: f32,
    i: u32,
}

var<workgroup> rv: array<f32, WG>;
var<workgroup> sv: array<f32, MOE_MAX_EXPERTS>; // the ranked score of every expert
var<workgroup> sk: array<f32, MOE_MAX_EXPERTS>; // the selected scores by rank
var<workgroup> si: array<u32, MOE_MAX_EXPERTS>; // the selected ids by rank
var<workgroup> gscore: array<f32, ROUTER_MAX_GROUPS>;
var<workgroup> kept: array<u32, ROUTER_MAX_GROUPS>;

// `b` if it ranks before `a` (NONE ids rank last).
fn better(a: Best, b: Best) -> Best {
    if (b.i != NONE && (a.i == NONE || ranks_before(b.v, b.i, a.v, a.i))) {
        return b;
    }
    return a;
}

// The top k of sv[0..e) into sk / si by rank, and ids[at + rank]. Ends at a barrier.
fn wg_top_k(lid: u32, e: u32, k: u32, at: u32) {
    workgroupBarrier();
    for (var i = lid; i < e; i += WG) {
        let v = sv[i];
        var rank = 0u;
        for (var j = 0u; j < e; j++) {
            if (ranks_before(sv[j], j, v, i)) {
                rank++;
            }
        }
        if (rank < k) {
            sk[rank] = v;
            si[rank] = i;
            ids[at + rank] = i;
        }
    }
    workgroupBarrier();
}

fn wg_sum(lid: u32, v: f32) -> f32 {
    rv[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            rv[lid] += rv[lid + s];
        }
        workgroupBarrier();
    }
    let r = rv[0];
    workgroupBarrier();
    return r;
}

fn wg_max(lid: u32, v: f32) -> f32 {
    rv[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            rv[lid] = max(rv[lid], rv[lid + s]);
        }
        workgroupBarrier();
    }
    let r = rv[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn route_softmax(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (t >= p.n) {
        return;
    }
    let base = t * p.e;
    var m = neg_inf();
    for (var i = lid; i < p.e; i += WG) {
        m = max(m, logits[base + i]);
    }
    m = wg_max(lid, m);
    var part = 0.0;
    for (var i = lid; i < p.e; i += WG) {
        part += exp(logits[base + i] - m);
    }
    let sum = wg_sum(lid, part);
    for (var i = lid; i < p.e; i += WG) {
        sv[i] = exp(logits[base + i] - m) / sum;
    }
    wg_top_k(lid, p.e, p.k, t * p.k);
    // The selected sum in pick order, as the reference folds it.
    if (lid == 0u) {
        var sel_sum = 0.0;
        for (var s = 0u; s < p.k; s++) {
            sel_sum += sk[s];
        }
        for (var s = 0u; s < p.k; s++) {
            wts[t * p.k + s] = select(sk[s], sk[s] / sel_sum, p.renormalize != 0u);
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn route_sigmoid(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (t >= p.n) {
        return;
    }
    let base = t * p.e;
    let per = p.e / p.n_group;
    if (p.topk_group >= p.n_group) {
        // Every group is kept (GLM-4.7-Flash: one group): no group scores needed.
        for (var g = lid; g < p.n_group; g += WG) {
            kept[g] = 1u;
        }
    } else {
        // Group score (one thread per group): the sum of the group's two best biased scores.
        for (var g = lid; g < p.n_group; g += WG) {
            var b1 = Best(0.0, NONE);
            for (var i = g * per; i < (g + 1u) * per; i++) {
                b1 = better(b1, Best(sigmoid(logits[base + i]) + bias[i], i));
            }
            var sum = 0.0 + b1.v;
            if (per > 1u) {
                var b2 = Best(0.0, NONE);
                for (var i = g * per; i < (g + 1u) * per; i++) {
                    let c = Best(sigmoid(logits[base + i]) + bias[i], i);
                    if (ranks_before(b1.v, b1.i, c.v, c.i)) {
                        b2 = better(b2, c);
                    }
                }
                sum += b2.v;
            }
            gscore[g] = sum;
            kept[g] = 0u;
        }
        workgroupBarrier();
        // Keep the best topk_group groups (few: one thread).
        if (lid == 0u) {
            var pg = Best(0.0, NONE);
            for (var s = 0u; s < p.topk_group; s++) {
                var bg = Best(0.0, NONE);
                for (var g = 0u; g < p.n_group; g++) {
                    let c = Best(gscore[g], g);
                    if (pg.i == NONE || ranks_before(pg.v, pg.i, c.v, c.i)) {
                        bg = better(bg, c);
                    }
                }
                kept[bg.i] = 1u;
                pg = bg;
            }
        }
    }
    workgroupBarrier();
    // Top k of the biased scores among the kept groups' experts (others rank as -inf); the
    // weights are the unbiased scores.
    for (var i = lid; i < p.e; i += WG) {
        var v = neg_inf();
        if (kept[i / per] != 0u) {
            v = sigmoid(logits[base + i]) + bias[i];
        }
        sv[i] = v;
    }
    wg_top_k(lid, p.e, p.k, t * p.k);
    if (lid == 0u) {
        var sel_sum = 0.0;
        for (var s = 0u; s < p.k; s++) {
            sel_sum += sigmoid(logits[base + si[s]]);
        }
        for (var s = 0u; s < p.k; s++) {
            var w = sigmoid(logits[base + si[s]]);
            if (p.renormalize != 0u) {
                w = w / (sel_sum + 1e-20);
            }
            wts[t * p.k + s] = w * p.scale;
        }
    }
}
