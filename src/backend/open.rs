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

/// As [`open`], with the layers' GEMMs at `precision` (`--precision`; tf32 on CUDA only).
pub fn open_at(device: &str, precision: Precision) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "cuda")]
    let cuda = || -> Result<Box<dyn Backend>> {
        let mut dev = cuda::Cuda::new(0)?;
        dev.set_precision(precision);
        Ok(Box::new(dev))
    };
    let open_cpu = || open_cpu(precision);
    match device {
        "cpu" => open_cpu(),
        #[cfg(feature = "cuda")]
        // A bad SEMSHARE_GPU is an error here too, and `emulated` is asked for, not probed.
        "auto" if cuda::emulation_requested()? || cuda::available() => cuda(),
        // Asked for an emulated (or any) CUDA device that this build cannot open.
        #[cfg(not(feature = "cuda"))]
        "auto" if std::env::var_os("SEMSHARE_GPU").is_some_and(|v| !v.is_empty()) => Err(crate::Error::Device {
            what: "SEMSHARE_GPU is set, but this build of semshare has no CUDA support (rebuild with `--features cuda`, or unset it)"
                .into(),
        }),
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
    Ok(Box::new(cpu::Cpu::with_precision(precision)?))
}
