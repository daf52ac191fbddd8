//! Synthetic models: the real architectures and shapes (the tables of `DESIGN.md`), with random
//! FP4 weights built directly as random codes and block scales — no f32 matrix is ever made —
//! so `bench model` and `run` without `--model` exercise the real kernels at the real shapes on
//! any machine, without a download.
//!
//! Scales are chosen so that activations stay O(1) through every layer: a projection `[N, K]`
//! gets elements of RMS `1/sqrt(K)`, so a unit-RMS input (every projection follows an RMSNorm
//! or a SwiGLU of such outputs) gives a unit-RMS output; embeddings have unit RMS and norm
//! weights are one. Embeddings, routers and lm_head are random bf16, as in the checkpoints.

use crate::layers::WeightSource;
use crate::{Error, LanguageModel, Result, glm4_moe_lite, qwen3_moe};
use fp4::{Format, QuantMatrix, e2m1, e4m3, e8m0};
use fp4moe_ops::{Backend, DenseDType, HostWeight};
use rayon::prelude::*;
use serde_json::{Value, json};
use std::path::Path;

/// The real architectures a synthetic model can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// GLM-4.7-Flash (`glm4_moe_lite`), 47 layers.
    Glm47Flash,
    /// Qwen3-30B-A3B (`qwen3_moe`), 48 layers.
    Qwen3_30bA3b,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Glm47Flash, Arch::Qwen3_30bA3b];

    /// The name the CLI takes (`glm-4.7-flash`, `qwen3-30b-a3b`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Glm47Flash => "glm-4.7-flash",
            Arch::Qwen3_30bA3b => "qwen3-30b-a3b",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(s))
    }

    /// The published `config.json` values that define the architecture (weights aside).
    pub fn config(self) -> Value {
        match self {
            Arch::Glm47Flash => json!({
                "model_type": glm4_moe_lite::MODEL_TYPE,
                "vocab_size": 154880,
                "hidden_size": 2048,
                "intermediate_size": 10240,
                "moe_intermediate_size": 1536,
                "num_hidden_layers": 47,
                "num_attention_heads": 20,
                "q_lora_rank": 768,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 192,
                "qk_rope_head_dim": 64,
                "v_head_dim": 256,
                "n_routed_experts": 64,
                "num_experts_per_tok": 4,
                "n_shared_experts": 1,
                "n_group": 1,
                "topk_group": 1,
                "norm_topk_prob": true,
                "routed_scaling_factor": 1.8,
                "first_k_dense_replace": 1,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e6,
                "rope_interleave": true,
                "max_position_embeddings": 202752,
                "tie_word_embeddings": false,
                "hidden_act": "silu",
            }),
            Arch::Qwen3_30bA3b => json!({
                "model_type": qwen3_moe::MODEL_TYPE,
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "norm_topk_prob": true,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "rms_norm_eps": 1e-6,
                "rope_theta": 1e6,
                "max_position_embeddings": 40960,
                "tie_word_embeddings": false,
                "hidden_act": "silu",
            }),
        }
    }
}

/// A synthetic model of `arch` (optionally with only `layers` decoder layers).
pub fn build<B: Backend + 'static>(
    backend: B,
    arch: Arch,
    layers: Option<usize>,
    format: Format,
    seed: u64,
) -> Result<Box<dyn LanguageModel>> {
    let mut config = arch.config();
    if let Some(n) = layers {
        if n == 0 {
            return Err(Error::Invalid("synthetic model: layers must be at least 1".into()));
        }
        config["num_hidden_layers"] = json!(n);
    }
    from_config(backend, &config, format, seed)
}

/// A synthetic model for any config of a supported `model_type` (tests use tiny ones).
pub fn from_config<B: Backend + 'static>(
    backend: B,
    config: &Value,
    format: Format,
    seed: u64,
) -> Result<Box<dyn LanguageModel>> {
    let mut src = Synthetic { format, seed };
    crate::build(backend, config, Path::new("<synthetic config>"), &mut src)
}

/// Random weights keyed by tensor name, so a weight does not depend on load order.
struct Synthetic {
    format: Format,
    seed: u64,
}

impl Synthetic {
    fn seed_for(&self, name: &str) -> u64 {
        // FNV-1a of the name, mixed with the user's seed.
        let h =
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        splitmix(h ^ self.seed)
    }
}

impl WeightSource for Synthetic {
    fn projection(&mut self, module: &str, [rows, cols]: [usize; 2]) -> Result<HostWeight> {
        random_fp4(rows, cols, self.format, self.seed_for(module)).map(HostWeight::Quant)
    }

    fn dense(&mut self, module: &str, [rows, cols]: [usize; 2]) -> Result<HostWeight> {
        // Embedding rows are the residual stream's start (unit RMS); routers and lm_head are
        // projections of a normed vector (RMS 1/sqrt(K) per element).
        let rms = if module.ends_with("embed_tokens") { 1.0 } else { 1.0 / (cols as f32).sqrt() };
        Ok(random_bf16(rows, cols, rms, self.seed_for(module)))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        if name.ends_with("e_score_correction_bias") {
            // Small positive biases, like the trained ones: they shift selection, not weights.
            let mut rng = Rng(self.seed_for(name));
            Ok((0..len).map(|_| 0.05 * rng.unit()).collect())
        } else {
            Ok(vec![1.0; len])
        }
    }

    fn experts(
        &mut self,
        prefix: &str,
        n_experts: usize,
        inter: usize,
        hidden: usize,
    ) -> Result<(HostWeight, HostWeight)> {
        let gu =
            random_fp4(n_experts * 2 * inter, hidden, self.format, self.seed_for(&format!("{prefix}.gu")))?;
        let down =
            random_fp4(n_experts * hidden, inter, self.format, self.seed_for(&format!("{prefix}.down")))?;
        Ok((HostWeight::Quant(gu), HostWeight::Quant(down)))
    }

    fn quantization(&self) -> String {
        format!("{} (synthetic random weights)", self.format.name())
    }
}

/// Bytes generated per rayon task (each task seeds its own generator from its index, so the
/// result does not depend on the thread count).
const CHUNK: usize = 1 << 16;

/// A random FP4 matrix `[rows, cols]` whose elements have RMS about `1/sqrt(cols)`: uniform
/// random codes (every E2M1 value, both signs) and one block-scale code chosen for that RMS.
fn random_fp4(rows: usize, cols: usize, format: Format, seed: u64) -> Result<QuantMatrix> {
    let name = "synthetic weight";
    let block = format.block();
    if !cols.is_multiple_of(block) {
        return Err(Error::fp4(
            name,
            fp4::Error::NotBlockMultiple { what: "columns", got: cols, block, format },
        ));
    }
    let code_rms = (e2m1::TABLE.iter().map(|v| v * v).sum::<f32>() / e2m1::TABLE.len() as f32).sqrt();
    let target = 1.0 / (cols as f32).sqrt() / code_rms;
    let (scale_code, tensor_scale) = match format {
        Format::Mxfp4 => (e8m0::encode_exponent(target.log2().round() as i32), 1.0),
        // A unit block scale; the tensor scale carries the magnitude exactly.
        Format::Nvfp4 => {
            let one = e4m3::encode(1.0);
            (one, target / e4m3::decode(one))
        }
    };
    let mut codes = vec![0u8; rows * cols / 2];
    fill_random(&mut codes, seed);
    let scales = vec![scale_code; rows * cols / block];
    QuantMatrix::new(format, rows, cols, codes.into(), scales.into(), vec![tensor_scale])
        .map_err(|e| Error::fp4(name, e))
}

/// A random bf16 matrix `[rows, cols]` with elements uniform in ±rms·√3 (RMS `rms`).
fn random_bf16(rows: usize, cols: usize, rms: f32, seed: u64) -> HostWeight {
    let half_width = rms * 3f32.sqrt();
    let mut bytes = vec![0u8; rows * cols * 2];
    bytes.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = Rng(splitmix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for v in chunk.chunks_exact_mut(2) {
            let x = (2.0 * rng.unit() - 1.0) * half_width;
            v.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
        }
    });
    HostWeight::Dense { rows, cols, dtype: DenseDType::BF16, bytes: bytes.into() }
}

fn fill_random(out: &mut [u8], seed: u64) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = Rng(splitmix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for c in chunk.chunks_mut(8) {
            let r = rng.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    });
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64 stream: fast, and good enough for weights nobody reads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.0)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp4moe_cpu::CpuBackend;

    /// The real per-layer shapes with a small vocabulary and fewer experts, so the test builds
    /// in well under a second while every projection keeps its real size.
    fn reduced(arch: Arch, layers: usize) -> Value {
        let mut c = arch.config();
        c["num_hidden_layers"] = json!(layers);
        c["vocab_size"] = json!(1024);
        match arch {
            Arch::Glm47Flash => c["n_routed_experts"] = json!(16),
            Arch::Qwen3_30bA3b => c["num_experts"] = json!(16),
        }
        c
    }

    #[test]
    fn real_shapes_keep_activations_order_one_in_both_formats() {
        for arch in Arch::ALL {
            for format in [Format::Mxfp4, Format::Nvfp4] {
                let model = from_config(CpuBackend::new(), &reduced(arch, 3), format, 7).unwrap();
                assert!(model.info().quantization.contains(format.name()));
                let mut seq = model.new_sequence(8).unwrap();
                let ids = [0, 1, 2, 1023, 5];
                let logits = model.forward(&mut [(&mut seq, &ids)], true).unwrap().remove(0);
                assert_eq!(logits.len(), ids.len() * 1024);
                assert!(logits.iter().all(|v| v.is_finite()), "{arch:?} {format:?}: non-finite logits");
                let rms = (logits.iter().map(|v| v * v).sum::<f32>() / logits.len() as f32).sqrt();
                println!("{arch:?} {format:?}: logit rms {rms}");
                assert!((0.1..10.0).contains(&rms), "{arch:?} {format:?}: logit rms {rms}");
                // Decode continues through the cache.
                let next = model.forward(&mut [(&mut seq, &[7])], false).unwrap().remove(0);
                assert!(next.iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn weights_depend_on_the_seed_only() {
        let run = |seed| {
            let model =
                from_config(CpuBackend::new(), &reduced(Arch::Qwen3_30bA3b, 1), Format::Mxfp4, seed).unwrap();
            let mut seq = model.new_sequence(2).unwrap();
            model.forward(&mut [(&mut seq, &[3, 4])], false).unwrap().remove(0)
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn real_configs_parse_with_the_design_shapes() {
        let glm = glm4_moe_lite::Config::from_json(&Arch::Glm47Flash.config(), Path::new("glm")).unwrap();
        assert_eq!((glm.num_layers, glm.cache_values_per_token()), (47, 576));
        assert_eq!(glm.sparse.iter().filter(|s| !**s).count(), 1, "one dense layer");
        let qwen = qwen3_moe::Config::from_json(&Arch::Qwen3_30bA3b.config(), Path::new("qwen")).unwrap();
        assert_eq!((qwen.num_layers, qwen.cache_values_per_token()), (48, 2 * 4 * 128));
        assert!(qwen.sparse.iter().all(|s| *s));
        for arch in Arch::ALL {
            assert_eq!(Arch::parse(arch.name()), Some(arch));
        }
    }
}
