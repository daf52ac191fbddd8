//! `fp4moe bench kernels|model`: each prints a table and, with `--json`, writes JSON.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Time each op at the models' shapes for several token counts against the bandwidth floor.
    Kernels(super::bench_kernels::Args),
    /// Build a synthetic model of the real shapes and measure prefill and decode tokens/s.
    Model(super::bench_model::Args),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Kernels(a) => super::bench_kernels::run(a),
        Command::Model(a) => super::bench_model::run(a),
    }
}
