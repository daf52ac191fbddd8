//! The adapter's cooperative matrices through naga, as the tensor-core prefill tiles will use
//! them: one f16 x f16 -> f32 multiply-add of the size the adapter offers (16x16x16 on the H100,
//! 8x8x8 on Apple GPUs), loaded row-major from storage, checked exactly against the host. Skips,
//! saying so, where no adapter offers one (lavapipe in CI).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

const SHADER: &str = "enable f16;
enable wgpu_cooperative_matrix;
@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(SUBGROUP)
fn main() {
    let ma = coopLoadT<coop_matSxS<f16, A>>(&a[0], Su);
    let mb = coopLoadT<coop_matSxS<f16, B>>(&b[0], Su);
    var mc = coopLoadT<coop_matSxS<f32, C>>(&c[0], Su);
    mc = coopMultiplyAdd(ma, mb, mc);
    coopStoreT(mc, &c[0], Su);
}
";

#[test]
fn cooperative_matrix_multiply_add_is_exact() {
    use wgpu::{CooperativeScalarType as T, Features};
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let wanted = Features::SHADER_F16 | Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    let found = block_on(instance.enumerate_adapters(wgpu::Backends::all())).into_iter().find_map(|a| {
        let size = a
            .cooperative_matrix_properties()
            .iter()
            .filter(|p| {
                p.ab_type == T::F16 && p.cr_type == T::F32 && p.m_size == p.n_size && p.n_size == p.k_size
            })
            .map(|p| p.m_size)
            .find(|&s| s == 8 || s == 16)?;
        a.features().contains(wanted).then_some((a, size))
    });
    let Some((adapter, s)) = found else {
        eprintln!("skipped: no adapter offers f16 x f16 -> f32 cooperative matrices");
        return;
    };
    let info = adapter.get_info();
    let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: None,
        required_features: wanted,
        required_limits: adapter.limits(),
        // SAFETY: the experimental feature is what this test checks against the host.
        experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .expect("device with cooperative matrices");
    let n = s as usize;
    let src = SHADER
        .replace("SUBGROUP", &info.subgroup_max_size.max(1).to_string())
        .replace("SxS", &format!("{s}x{s}"))
        .replace("Su", &format!("{s}u"));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    // Small integers and halves: every product and sum is exact in f16 inputs and f32 sums.
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
    let c0: Vec<f32> = (0..n * n).map(|i| (i % 3) as f32).collect();
    let f16_bytes =
        |v: &[f32]| v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
    use wgpu::util::DeviceExt;
    let init = |bytes: &[u8], usage| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytes, usage })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let ba = init(&f16_bytes(&a), storage);
    let bb = init(&f16_bytes(&b), storage);
    let c_bytes: Vec<u8> = c0.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bc = init(&c_bytes, storage | wgpu::BufferUsages::COPY_SRC);
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: c_bytes.len() as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: ba.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: bb.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 2, resource: bc.as_entire_binding() },
        ],
    });
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    enc.copy_buffer_to_buffer(&bc, 0, &read, 0, c_bytes.len() as u64);
    queue.submit([enc.finish()]);
    read.slice(..).map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    let got: Vec<f32> = read
        .slice(..)
        .get_mapped_range()
        .expect("mapped")
        .chunks_exact(4)
        .map(|w| f32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect();
    for i in 0..n {
        for j in 0..n {
            let want = c0[i * n + j] + (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum::<f32>();
            assert_eq!(got[i * n + j], want, "C[{i}][{j}] on {} ({s}x{s}x{s})", info.name);
        }
    }
    eprintln!("{s}x{s}x{s} f16 -> f32 cooperative multiply-add exact on {}", info.name);
}
