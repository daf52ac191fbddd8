//! `fp4moe bench model` (not yet implemented).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fp4moe bench model` is not implemented yet")
}
