// Routers, one thread per token (E is small; the sums run in expert order as the reference's
// do). Top-k picks repeatedly the best entry ranked after the previous pick in the order
// "descending value, ties to the lower id" (`ranks_before`), so no selected-set is kept.

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

@compute @workgroup_size(WG)
fn route_softmax(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= p.n) {
        return;
    }
    let base = t * p.e;
    var m = neg_inf();
    for (var i = 0u; i < p.e; i++) {
        m = max(m, logits[base + i]);
    }
    var sum = 0.0;
    for (var i = 0u; i < p.e; i++) {
        sum += exp(logits[base + i] - m);
    }
    var pv = 0.0;
    var pi = 0xffffffffu;
    var sel_sum = 0.0;
    for (var s = 0u; s < p.k; s++) {
        var bv = 0.0;
        var bi = 0xffffffffu;
        for (var i = 0u; i < p.e; i++) {
            let v = exp(logits[base + i] - m) / sum;
            let after_prev = pi == 0xffffffffu || ranks_before(pv, pi, v, i);
            if (after_prev && (bi == 0xffffffffu || ranks_before(v, i, bv, bi))) {
                bv = v;
                bi = i;
            }
        }
        ids[t * p.k + s] = bi;
        wts[t * p.k + s] = bv;
        sel_sum += bv;
        pv = bv;
        pi = bi;
    }
    if (p.renormalize != 0u) {
        for (var s = 0u; s < p.k; s++) {
            wts[t * p.k + s] = wts[t * p.k + s] / sel_sum;
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn route_sigmoid(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= p.n) {
        return;
    }
    let base = t * p.e;
    let per = p.e / p.n_group;
    // Group score: the sum of the group's two best biased scores.
    var gscore: array<f32, ROUTER_MAX_GROUPS>;
    for (var g = 0u; g < p.n_group; g++) {
        var v1 = 0.0;
        var i1 = 0xffffffffu;
        for (var i = g * per; i < (g + 1u) * per; i++) {
            let b = sigmoid(logits[base + i]) + bias[i];
            if (i1 == 0xffffffffu || ranks_before(b, i, v1, i1)) {
                v1 = b;
                i1 = i;
            }
        }
        var sum = 0.0 + v1;
        if (per > 1u) {
            var v2 = 0.0;
            var i2 = 0xffffffffu;
            for (var i = g * per; i < (g + 1u) * per; i++) {
                let b = sigmoid(logits[base + i]) + bias[i];
                if (ranks_before(v1, i1, b, i) && (i2 == 0xffffffffu || ranks_before(b, i, v2, i2))) {
                    v2 = b;
                    i2 = i;
                }
            }
            sum += v2;
        }
        gscore[g] = sum;
    }
    // Keep the best topk_group groups.
    var kept: array<bool, ROUTER_MAX_GROUPS>;
    var pv = 0.0;
    var pi = 0xffffffffu;
    for (var s = 0u; s < p.topk_group; s++) {
        var bv = 0.0;
        var bi = 0xffffffffu;
        for (var g = 0u; g < p.n_group; g++) {
            let after_prev = pi == 0xffffffffu || ranks_before(pv, pi, gscore[g], g);
            if (after_prev && (bi == 0xffffffffu || ranks_before(gscore[g], g, bv, bi))) {
                bv = gscore[g];
                bi = g;
            }
        }
        kept[bi] = true;
        pv = bv;
        pi = bi;
    }
    // Top k of the biased scores among the kept groups' experts (others rank as -inf).
    pv = 0.0;
    pi = 0xffffffffu;
    var sel_sum = 0.0;
    for (var s = 0u; s < p.k; s++) {
        var bv = 0.0;
        var bi = 0xffffffffu;
        for (var i = 0u; i < p.e; i++) {
            var c = neg_inf();
            if (kept[i / per]) {
                c = sigmoid(logits[base + i]) + bias[i];
            }
            let after_prev = pi == 0xffffffffu || ranks_before(pv, pi, c, i);
            if (after_prev && (bi == 0xffffffffu || ranks_before(c, i, bv, bi))) {
                bv = c;
                bi = i;
            }
        }
        let score = sigmoid(logits[base + bi]);
        ids[t * p.k + s] = bi;
        wts[t * p.k + s] = score;
        sel_sum += score;
        pv = bv;
        pi = bi;
    }
    for (var s = 0u; s < p.k; s++) {
        var w = wts[t * p.k + s];
        if (p.renormalize != 0u) {
            w = w / (sel_sum + 1e-20);
        }
        wts[t * p.k + s] = w * p.scale;
    }
}
