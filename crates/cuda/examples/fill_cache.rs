//! Compiles every CUDA kernel for an arch into the disk cache of compiled images, on a machine
//! without a GPU (NVRTC only): `fill_cache [arch] [--traced]`, arch `sm_90a` by default. The
//! directory is the runtime's (`FP4MOE_CUDA_CACHE`, else the XDG / home cache), so a device
//! call that carries it skips NVRTC in its first process (tools/device/cuda.sh).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let traced = args.iter().any(|a| a == "--traced");
    let arch = args.iter().find(|a| !a.starts_with("--")).map_or("sm_90a", String::as_str);
    match fp4moe_cuda::fill_disk_cache(arch, traced) {
        Ok(images) => {
            for (path, cached) in images {
                println!("{} {}", if cached { "cached  " } else { "compiled" }, path.display());
            }
        }
        Err(e) => {
            eprintln!("fill_cache: {e}");
            std::process::exit(1);
        }
    }
}
