// Activations for the cooperative-matrix GEMMs (coop_gemm.wgsl): each f32 row x becomes two f16
// terms, hi = f16(x * 2^-e) and lo = f16(x * 2^-e - hi), and the row factor 2^e. The matrices
// multiply f16 only, and one f16 term (11 bits) would miss the conformance suite's f32
// tolerance by ~10x; two leave ~2^-22 of each element. The factor puts the row's largest
// magnitude in [2^14, 2^15): no f16 overflow, and lo stays clear of the f16 subnormals for
// every element that matters to the row's dot products. Rows are padded with zeros to `kv`
// vectors of 8 halves (a whole number of the GEMM's 32-wide k steps).

struct P {
    rows: u32,
    k: u32,
    kv: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, k]
@group(0) @binding(2) var<storage, read_write> a_hi: array<u32>; // [rows, 4 kv] f16 pairs
@group(0) @binding(3) var<storage, read_write> a_lo: array<u32>; // [rows, 4 kv] f16 pairs
@group(0) @binding(4) var<storage, read_write> a_rf: array<f32>; // [rows] 2^e

var<workgroup> red: array<f32, WG>;

// Exponent of the row scale: the largest magnitude's binary exponent minus 14, kept where 2^e and
// 2^-e are normal f32 (a row of zeros, or one below 2^-86, just loses its lowest bits).
fn row_exp(mx: f32) -> i32 {
    let e = i32((bitcast<u32>(mx) >> 23u) & 255u) - 127 - 14;
    return clamp(e, -100, 100);
}

@compute @workgroup_size(WG)
fn split(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let lid = lid3.x;
    let base = row * p.k;
    var mx = 0.0;
    for (var i = lid; i < p.k; i += WG) {
        mx = max(mx, abs(x[base + i]));
    }
    red[lid] = mx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let e = row_exp(red[0]);
    let down = ldexp(1.0, -e);
    if (lid == 0u) {
        a_rf[row] = ldexp(1.0, e);
    }
    let words = 4u * p.kv;
    for (var j = lid; j < words; j += WG) {
        let i = 2u * j;
        var v = vec2<f32>(0.0);
        if (i < p.k) {
            v.x = x[base + i];
        }
        if (i + 1u < p.k) {
            v.y = x[base + i + 1u];
        }
        v *= down;
        // hi: v rounded to f16's 11 significant bits by mask, in f32, so that lo = v - hi is
        // exact; a pack / unpack round trip there is something a driver's compiler may fold
        // away. (Below 2^-14, f16 subnormals keep fewer bits: those elements are 2^-28 of the
        // row's largest, and their lo is off by at most 2^-25.)
        let hi = bitcast<vec2<f32>>((bitcast<vec2<u32>>(v) + vec2<u32>(0x1000u)) & vec2<u32>(0xffffe000u));
        a_hi[row * words + j] = pack2x16float(hi);
        a_lo[row * words + j] = pack2x16float(v - hi);
    }
}
