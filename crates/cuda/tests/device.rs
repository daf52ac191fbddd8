//! CUDA-specific checks beyond the shared suite: the probe answers without a device, every
//! kernel file compiles for the device, and determinism of the MoE paths (bit-identical repeats).

use fp4moe_cuda::{CudaBackend, CudaError, KERNEL_FILES};
use fp4moe_ops::{Backend, HostTensor, HostWeight, MoeWeights};

#[test]
fn probe_is_a_typed_answer() {
    // On a machine without CUDA this must be an error, not a panic; with one, a backend.
    match CudaBackend::new() {
        Ok(b) => println!("device: {} ({})", b.device_name(), b.arch()),
        Err(e @ (CudaError::LibraryMissing | CudaError::NoDevice(_))) => println!("skipped: {e}"),
        Err(e) => panic!("unexpected probe error: {e}"),
    }
}

#[test]
fn every_kernel_file_compiles_on_the_device() {
    let Ok(b) = CudaBackend::new() else {
        println!("skipped: no CUDA device");
        return;
    };
    for (file, src) in KERNEL_FILES {
        let cubin = fp4moe_cuda::compile(file, src, b.arch(), false).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.is_empty(), "{file}: empty cubin");
    }
    // The replay-timeline instrumentation lives in common.cuh's wait, which every file shares:
    // one file compiled with it checks it.
    let (file, src) = KERNEL_FILES[0];
    let cubin = fp4moe_cuda::compile(file, src, b.arch(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cubin.is_empty(), "{file} (traced): empty cubin");
    b.warm_up().unwrap();
}

/// Same inputs twice through each MoE path: the outputs must be bit-identical (the grouped path
/// assigns rows with integer atomics; the combine must not depend on that order).
#[test]
fn moe_paths_repeat_bit_for_bit() {
    let Ok(b) = CudaBackend::new() else {
        println!("skipped: no CUDA device");
        return;
    };
    let (e, h, i, n, k) = (16usize, 256usize, 128usize, 97usize, 4usize);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let q = |rows: usize, cols: usize, r: &mut dyn FnMut() -> f32| {
        let w: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
        HostWeight::Quant(fp4::quantize(&w, rows, cols, fp4::Format::Nvfp4).unwrap().matrix)
    };
    let gu = b.upload_weight(&q(e * 2 * i, h, &mut rnd)).unwrap();
    let dn = b.upload_weight(&q(e * h, i, &mut rnd)).unwrap();
    let x: Vec<f32> = (0..n * h).map(|_| rnd()).collect();
    let ids: Vec<u32> = (0..n * k).map(|p| ((p * 7 + p / k) % e) as u32).collect();
    let wts: Vec<f32> = (0..n * k).map(|_| rnd() + 0.5).collect();
    let xt = b.upload(HostTensor::F32(&x, &[n, h])).unwrap();
    let it = b.upload(HostTensor::U32(&ids, &[n, k])).unwrap();
    let wt = b.upload(HostTensor::F32(&wts, &[n, k])).unwrap();
    for path in b.moe_paths() {
        let run = || {
            let ew = MoeWeights { gate_up: &gu, down: &dn, n_experts: e, shared: None };
            b.download(&b.moe(&xt, &it, &wt, ew, path).unwrap()).unwrap().into_f32().unwrap()
        };
        let (a, c) = (run(), run());
        assert!(a.iter().all(|v| v.is_finite()), "{path:?}: non-finite output");
        assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "{path:?}: repeat differs");
    }
}
