//! `fp4moe autotune` (not yet implemented).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fp4moe autotune` is not implemented yet")
}
