//! `fp4moe bench kernels|model|sampling`: each prints a table and, with `--json`, writes JSON.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Time each op at the models' shapes for several token counts against the bandwidth floor.
    Kernels(super::bench_kernels::Args),
    /// Build a synthetic model of the real shapes and measure prefill and decode tokens/s.
    Model(super::bench_model::Args),
    /// Time the host's pick of a token from a whole logits row, per sampling setting.
    Sampling(super::bench_sampling::Args),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Kernels(a) => super::bench_kernels::run(a),
        Command::Model(a) => super::bench_model::run(a),
        Command::Sampling(a) => super::bench_sampling::run(a),
    }
}
