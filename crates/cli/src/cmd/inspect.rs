//! `fp4moe inspect` (not yet implemented).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fp4moe inspect` is not implemented yet")
}
