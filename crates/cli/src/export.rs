//! `palm export`: a model directory's weights as safetensors with the reference key names.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::device::Cpu;
use crate::model_dir::load;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (ModelScope or written by palm).
    #[arg(long)]
    model: PathBuf,
    /// The .safetensors file to write.
    #[arg(long)]
    output: PathBuf,
    /// Key prefix: "palm." gives PalmForTextGeneration names, "" AbsSummarizer names.
    #[arg(long, default_value = "palm.")]
    prefix: String,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.output.exists() && !args.force {
        bail!(
            "{}: already exists; pass --force to replace it",
            args.output.display()
        );
    }
    let device = burn_ndarray::NdArrayDevice::Cpu;
    let loaded = load::<Cpu>(&args.model, &device)?;
    palm_model::export::export_safetensors(&loaded.model, &args.output, &args.prefix)?;
    println!("wrote {}", args.output.display());
    Ok(())
}
