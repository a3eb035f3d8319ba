//! Picking a backend by name: the one place that knows every device, so that the trait
//! (`backend/mod.rs`) imports none of its implementations.

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Backend, Precision, cpu};
use crate::Result;

/// Open the device named on the command line: `cpu`, `cuda`, or `auto` (CUDA when this
/// build has it and a GPU is present, else the CPU), computing in fp32.
pub fn open(device: &str) -> Result<Box<dyn Backend>> {
    open_at(device, Precision::F32)
}

/// As [`open`], with the layers' GEMMs at `precision` (`--precision`). bf16 is built on the
/// CPU only; on CUDA it is a one-line error until the GPU's bf16 step exists (issue 12).
pub fn open_at(device: &str, precision: Precision) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "cuda")]
    let cuda = || -> Result<Box<dyn Backend>> {
        if precision != Precision::F32 {
            return Err(crate::Error::config(format!(
                "precision {} is not built for the CUDA backend yet (use fp32 there, or --device cpu)",
                precision.name()
            )));
        }
        Ok(Box::new(cuda::Cuda::new(0)?))
    };
    let open_cpu = || open_cpu(precision);
    match device {
        "cpu" => open_cpu(),
        #[cfg(feature = "cuda")]
        "auto" if cuda::available() => cuda(),
        "auto" => open_cpu(),
        #[cfg(feature = "cuda")]
        "cuda" => cuda(),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(crate::Error::Device {
            what: "this build of semshare has no CUDA support (rebuild with `--features cuda`)".into(),
        }),
        other => Err(crate::Error::config(format!("unknown device `{other}` (expected auto, cpu or cuda)"))),
    }
}

/// The CPU, once its kernels' path is settled: a bad `SEMSHARE_CPU` fails here, in one line.
fn open_cpu(precision: Precision) -> Result<Box<dyn Backend>> {
    cpu::dispatch::active()?;
    Ok(Box::new(cpu::Cpu::with_precision(precision)))
}
