//! Picking a backend by name: the one place that knows every device, so that the trait
//! (`backend/mod.rs`) imports none of its implementations.

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Backend, cpu};
use crate::Result;

/// Open the device named on the command line: `cpu`, `cuda`, or `auto` (CUDA when this
/// build has it and a GPU is present, else the CPU).
pub fn open(device: &str) -> Result<Box<dyn Backend>> {
    match device {
        "cpu" => open_cpu(),
        #[cfg(feature = "cuda")]
        "auto" if cuda::available() => Ok(Box::new(cuda::Cuda::new(0)?)),
        "auto" => open_cpu(),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Box::new(cuda::Cuda::new(0)?)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(crate::Error::Device {
            what: "this build of semshare has no CUDA support (rebuild with `--features cuda`)".into(),
        }),
        other => Err(crate::Error::config(format!("unknown device `{other}` (expected auto, cpu or cuda)"))),
    }
}

/// The CPU, once its kernels' path is settled: a bad `SEMSHARE_CPU` fails here, in one line.
fn open_cpu() -> Result<Box<dyn Backend>> {
    cpu::dispatch::active()?;
    Ok(Box::new(cpu::Cpu::new()))
}
