// Appended to moe_gemv.wgsl with weight_quant_multi.wgsl's access block: the decode path's two
// MoE products with the shared expert's in the same dispatches (GLM's one shared expert took
// three dispatches of its own: gate/up, SiLU, down). The routed experts' weight is weight 0,
// the shared expert's weight 1 (weight 2 binds weight 0 again, unread). Workgroups with
// z >= p.pairs serve token z - p.pairs through the shared expert: its act rows follow the
// routed pairs' (p.inter_sh wide) and its output rows follow theirs in `out`, where
// norm.wgsl's moe_term reads them.

@compute @workgroup_size(WG)
fn moe_gate_up_gemv_sh(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let pair = wid.z;
    let j = wid.x * GEMV_ROWS + lid3.x / GEMV_LANES;
    if (pair >= p.pairs) {
        let t = pair - p.pairs;
        w_sel = 1u;
        gate_up_row(lid3.x, j, 0u, p.inter_sh, t * p.h, p.pairs * p.inter + t * p.inter_sh);
        return;
    }
    gate_up_pair(lid3.x, pair, j);
}

@compute @workgroup_size(WG)
fn moe_down_gemv_sh(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let pair = wid.z;
    let n = wid.x * GEMV_ROWS + lid3.x / GEMV_LANES;
    if (pair >= p.pairs) {
        let t = pair - p.pairs;
        w_sel = 1u;
        down_row(lid3.x, n, n, p.inter_sh, p.pairs * p.inter + t * p.inter_sh, pair * p.h);
        return;
    }
    down_pair(lid3.x, pair, n);
}
