//! `fp4moe inspect DIR`: what a checkpoint is (architecture, depth, quantization) and where its
//! bytes go (by dtype and by kind of weight), read from the safetensors headers without loading
//! any weight.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use fp4moe_models::loader::Checkpoint;
use serde_json::{Value, json};

/// `fp4moe inspect`
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + *.safetensors).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The kind of weight a tensor name belongs to, for the memory breakdown. Names follow the HF
/// checkpoints of both models (and this project's FP4 layout, which keeps module names).
pub fn category(name: &str) -> &'static str {
    if name.contains("embed_tokens") {
        "embedding"
    } else if name.starts_with("lm_head") {
        "lm_head"
    } else if name.contains(".self_attn.") && !name.contains("norm") {
        "attention"
    } else if name.contains(".shared_expert") {
        "shared experts"
    } else if name.contains(".experts") {
        "routed experts"
    } else if name.contains(".mlp.gate.") {
        "router"
    } else if name.contains(".mlp.") {
        "dense mlp"
    } else if name.contains("norm") {
        "norms"
    } else {
        "other"
    }
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = &args.dir;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory (inspect takes a checkpoint directory)", dir.display());
    }
    let ckpt = Checkpoint::open(dir).with_context(|| format!("opening checkpoint {}", dir.display()))?;
    let config = ckpt.config();
    let model_type = ckpt.model_type()?.to_owned();
    let supported = fp4moe_models::SUPPORTED_MODEL_TYPES.contains(&model_type.as_str());
    let layers = config.get("num_hidden_layers").and_then(Value::as_u64);

    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_category: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0u64;
    for name in ckpt.names() {
        let info = ckpt.info(name)?;
        let bytes = ckpt.bytes(name)?.len() as u64;
        *by_dtype.entry(format!("{:?}", info.dtype)).or_default() += bytes;
        *by_category.entry(category(name)).or_default() += bytes;
        total += bytes;
    }
    let files = ckpt.files().count();
    let tokenizer = dir.join("tokenizer.json").is_file();
    let chat_template =
        fp4moe_engine::Tokenizer::from_dir(dir).ok().is_some_and(|t| t.chat_template().is_some());
    let key = |k: &str| config.get(k).cloned().unwrap_or(Value::Null);

    if args.json {
        let out = json!({
            "dir": dir.display().to_string(),
            "model_type": model_type,
            "supported": supported,
            "layers": layers,
            "vocab_size": key("vocab_size"),
            "hidden_size": key("hidden_size"),
            "experts": config.get("num_experts").or(config.get("n_routed_experts")).or(config.get("num_local_experts")),
            "experts_per_token": key("num_experts_per_tok"),
            "max_position_embeddings": key("max_position_embeddings"),
            "quantization": ckpt.quantization().describe(),
            "tensors": ckpt.len(),
            "files": files,
            "total_bytes": total,
            "bytes_by_dtype": by_dtype,
            "bytes_by_category": by_category,
            "tokenizer": tokenizer,
            "chat_template": chat_template,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    println!("directory      {}", dir.display());
    println!("architecture   {model_type}{}", if supported { "" } else { "  (not supported by fp4moe)" });
    println!("layers         {}", layers.map_or("?".into(), |l| l.to_string()));
    let experts =
        config.get("num_experts").or(config.get("n_routed_experts")).or(config.get("num_local_experts"));
    println!(
        "shape          hidden {}, vocab {}, experts {} (top {}), context {}",
        key("hidden_size"),
        key("vocab_size"),
        experts.cloned().unwrap_or(Value::Null),
        key("num_experts_per_tok"),
        key("max_position_embeddings")
    );
    println!("quantization   {}", ckpt.quantization().describe());
    println!("tensors        {} in {} file(s), {}", ckpt.len(), files, gib(total));
    println!(
        "tokenizer      {}{}",
        if tokenizer { "tokenizer.json" } else { "missing (run/chat need tokenizer.json)" },
        if chat_template { ", chat template" } else { "" }
    );
    println!("\nbytes by dtype");
    for (dtype, bytes) in &by_dtype {
        println!("  {dtype:<14} {:>12}  {:>5.1}%", gib(*bytes), 100.0 * *bytes as f64 / total.max(1) as f64);
    }
    println!("\nbytes by kind of weight");
    let mut cats: Vec<_> = by_category.into_iter().collect();
    cats.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
    for (cat, bytes) in cats {
        println!("  {cat:<14} {:>12}  {:>5.1}%", gib(bytes), 100.0 * bytes as f64 / total.max(1) as f64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::category;

    #[test]
    fn categories_of_real_tensor_names() {
        let cases = [
            ("model.embed_tokens.weight", "embedding"),
            ("lm_head.weight", "lm_head"),
            ("model.layers.3.self_attn.q_proj.weight", "attention"),
            ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale", "attention"),
            ("model.layers.3.self_attn.q_norm.weight", "norms"),
            ("model.layers.3.mlp.experts.17.down_proj.weight", "routed experts"),
            ("model.layers.3.mlp.experts.gate_up.weight_packed", "routed experts"),
            ("model.layers.3.mlp.shared_experts.up_proj.weight", "shared experts"),
            ("model.layers.3.mlp.gate.weight", "router"),
            ("model.layers.3.mlp.gate.e_score_correction_bias", "router"),
            ("model.layers.0.mlp.gate_proj.weight", "dense mlp"),
            ("model.layers.0.input_layernorm.weight", "norms"),
            ("model.norm.weight", "norms"),
        ];
        for (name, want) in cases {
            assert_eq!(category(name), want, "{name}");
        }
    }
}
