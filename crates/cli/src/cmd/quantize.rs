//! `fp4moe quantize` (not yet implemented).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fp4moe quantize` is not implemented yet")
}
