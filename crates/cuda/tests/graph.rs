//! Batch-1 decode replayed from a recorded CUDA graph gives the same logits, bit for bit, as the
//! same steps launched op by op (`FP4MOE_GRAPHS=0`), for both models at their real shapes (two
//! layers), across attention splits and positions the graph was not recorded at. One test in
//! its own binary, because it switches the environment variable. Skips without a CUDA device.

use fp4moe_cuda::CudaBackend;
use fp4moe_models::{Arch, LanguageModel, decode_graph_replays};

const PROMPT: usize = 200; // keys past 192: the split attention path with several live ranges
const STEPS: usize = 8;

fn decode(model: &dyn LanguageModel, vocab: usize) -> Vec<Vec<f32>> {
    let mut seq = model.new_sequence(1024).expect("sequence");
    let prompt: Vec<u32> = (0..PROMPT).map(|i| ((i * 7919) % vocab) as u32).collect();
    let mut out = model.forward(&mut [(&mut seq, &prompt)], false).expect("prefill");
    for s in 0..STEPS {
        let next = ((s * 104_729 + 17) % vocab) as u32;
        out.extend(model.forward(&mut [(&mut seq, &[next])], false).expect("decode"));
    }
    out
}

#[test]
fn graph_replays_match_op_by_op_decode() {
    let Ok(b) = CudaBackend::new() else {
        println!("skipped: no CUDA device");
        return;
    };
    for arch in Arch::ALL {
        let model = fp4moe_models::synthetic(b.with_config(b.config()), arch, Some(2), fp4::Format::Mxfp4, 7)
            .expect("synthetic model");
        let vocab = model.info().vocab_size;
        let before = decode_graph_replays();
        let graphed = decode(model.as_ref(), vocab);
        let replays = decode_graph_replays() - before;
        // Step 1 runs op by op (warm-up), step 2 records and launches, the rest replay.
        assert_eq!(replays, (STEPS - 2) as u64, "{}: graph replays", arch.name());
        // SAFETY: this binary has one test, so no other thread reads the environment.
        unsafe { std::env::set_var("FP4MOE_GRAPHS", "0") };
        let eager = decode(model.as_ref(), vocab);
        unsafe { std::env::remove_var("FP4MOE_GRAPHS") };
        assert_eq!(decode_graph_replays() - before, replays, "graphs off must not replay");
        for (i, (g, e)) in graphed.iter().zip(&eager).enumerate() {
            let same = g.len() == e.len() && g.iter().zip(e).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: step {i} logits differ between graph replay and op-by-op", arch.name());
        }
        println!("{}: {replays} replayed decode steps identical to op-by-op", arch.name());
    }
}
