//! Which instruction-set path the CPU kernels take: detected once per process at run time, the
//! best one this CPU can run, or the one `SEMSHARE_CPU=amx|avx512|avx2|portable` forces.
//!
//! Paths: `amx` (the `avx512` path whose bf16 GEMM runs on AMX tiles, amx.rs: AMX-TILE and
//! AMX-BF16, AVX-512 BF16, and Linux's permission for the tile data, asked once), `avx512`
//! (AVX-512 F/DQ/BW/VL, x86-64; with AVX-512 BF16 its bf16 GEMM runs on `vdpbf16ps`), `avx2`
//! (AVX2 + FMA) and `portable` (plain Rust, every target). On a CPU without AMX its tests run
//! it with the AMX instructions trapped and emulated ([`Kernels::assume`]).

use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable that forces a path.
pub const ENV: &str = "SEMSHARE_CPU";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPath {
    Amx,
    Avx512,
    Avx2,
    Portable,
}

impl CpuPath {
    /// Best first: the order in which detection tries them.
    pub const ALL: [CpuPath; 4] = [CpuPath::Amx, CpuPath::Avx512, CpuPath::Avx2, CpuPath::Portable];

    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Amx => "amx",
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx2 => "avx2",
            CpuPath::Portable => "portable",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        CpuPath::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            Error::config(format!("{ENV}={s}: unknown CPU path (expected one of amx, avx512, avx2, portable)"))
        })
    }

    /// The first CPU feature this path needs that this CPU lacks, if any.
    pub fn missing_feature(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            let needs: &[(&str, bool)] = match self {
                CpuPath::Amx => &[
                    ("avx512f", is_x86_feature_detected!("avx512f")),
                    ("avx512dq", is_x86_feature_detected!("avx512dq")),
                    ("avx512bw", is_x86_feature_detected!("avx512bw")),
                    ("avx512vl", is_x86_feature_detected!("avx512vl")),
                    ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
                    ("amx-tile", amx_bits().0),
                    ("amx-bf16", amx_bits().1),
                ],
                CpuPath::Avx512 => &[
                    ("avx512f", is_x86_feature_detected!("avx512f")),
                    ("avx512dq", is_x86_feature_detected!("avx512dq")),
                    ("avx512bw", is_x86_feature_detected!("avx512bw")),
                    ("avx512vl", is_x86_feature_detected!("avx512vl")),
                ],
                CpuPath::Avx2 => {
                    &[("avx2", is_x86_feature_detected!("avx2")), ("fma", is_x86_feature_detected!("fma"))]
                }
                CpuPath::Portable => &[],
            };
            needs.iter().find(|(_, has)| !has).map(|(name, _)| *name)
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {
            CpuPath::Amx => Some("amx-tile (x86-64 only)"),
            CpuPath::Avx512 => Some("avx512f (x86-64 only)"),
            CpuPath::Avx2 => Some("avx2 (x86-64 only)"),
            CpuPath::Portable => None,
        }
    }

    /// The kernels of this path, or why this machine cannot run them (one line).
    pub fn kernels(self) -> std::result::Result<Kernels, String> {
        if let Some(f) = self.missing_feature() {
            return Err(format!("the {} path needs {f}, which this CPU lacks", self.name()));
        }
        if self == CpuPath::Amx {
            tile_permission().map_err(|why| format!("the amx path needs the AMX tile data: {why}"))?;
        }
        Ok(Kernels(self))
    }
}

/// Linux's permission for this process to use the AMX tile data (XTILEDATA, state component
/// 18), asked once: without it the first tile instruction is an illegal-instruction signal.
fn tile_permission() -> std::result::Result<(), String> {
    static GRANTED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    GRANTED
        .get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
                const XFEATURE_XTILEDATA: usize = 18;
                let ret: isize;
                // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, 18) only asks the kernel to let this
                // process enable a state component; it reads and writes no memory of ours.
                unsafe {
                    std::arch::asm!(
                        "syscall",
                        inlateout("rax") 158isize => ret, // SYS_arch_prctl
                        in("rdi") ARCH_REQ_XCOMP_PERM,
                        in("rsi") XFEATURE_XTILEDATA,
                        lateout("rcx") _,
                        lateout("r11") _,
                        options(nostack)
                    );
                }
                if ret == 0 { Ok(()) } else { Err(format!("Linux refused it (arch_prctl errno {})", -ret)) }
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            Err("this version asks for it on Linux only".to_string())
        })
        .clone()
}

/// (AMX-TILE, AMX-BF16) from CPUID leaf 7 (EDX bits 24 and 22): `is_x86_feature_detected!`
/// has no stable name for them.
#[cfg(target_arch = "x86_64")]
fn amx_bits() -> (bool, bool) {
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is valid when leaf 0 reports it.
    #[allow(unused_unsafe)] // safe to call from Rust 1.94 on; unsafe before
    let edx = unsafe {
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return (false, false);
        }
        std::arch::x86_64::__cpuid_count(7, 0).edx
    };
    (edx & (1 << 24) != 0, edx & (1 << 22) != 0)
}

/// Proof that this CPU can run a path's kernels: only [`CpuPath::kernels`] makes one, so an
/// intrinsic the CPU lacks is never reached (no illegal-instruction signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(CpuPath);

impl Kernels {
    pub fn path(self) -> CpuPath {
        self.0
    }

    /// The kernels of `path` without asking the CPU or the OS: for a harness that runs in
    /// software the instructions this CPU lacks (tests/common/amx_trap.rs, for AMX's).
    ///
    /// # Safety
    /// Every instruction of the path that this CPU lacks is emulated, for the rest of the
    /// process, by a handler the caller installed.
    pub unsafe fn assume(path: CpuPath) -> Kernels {
        Kernels(path)
    }

    /// Whether bf16 GEMMs run on `vdpbf16ps` (AVX-512 BF16) on this path; otherwise the path's
    /// fp32 kernel multiplies operands rounded to bf16 (the same products, `Bf16OnF32`).
    pub fn bf16_native(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self.0, CpuPath::Avx512 | CpuPath::Amx) && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The path's name and, where it has one, its bf16 unit: `avx512+bf16` (`amx`: the tiles).
    pub fn describe(self) -> String {
        if self.bf16_native() && self.0 != CpuPath::Amx {
            format!("{}+bf16", self.0.name())
        } else {
            self.0.name().to_string()
        }
    }
}

/// The best path this CPU can run.
pub fn best() -> Kernels {
    CpuPath::ALL.into_iter().find_map(|p| p.kernels().ok()).expect("the portable path runs everywhere")
}

/// The path for a value of `SEMSHARE_CPU` (`None`: unset, the best one).
pub fn select(forced: Option<&str>) -> Result<Kernels> {
    match forced {
        None | Some("") => Ok(best()),
        Some(name) => CpuPath::parse(name)?.kernels().map_err(|why| Error::config(format!("{ENV}={name}: {why}"))),
    }
}

static ACTIVE: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();

/// Makes `kernels` this process's path ([`active`]) unless one was already chosen; false then.
/// For a harness that made them with [`Kernels::assume`].
pub fn set_active(kernels: Kernels) -> bool {
    ACTIVE.set(Ok(kernels)).is_ok()
}

/// The path of this process, chosen on first use from `SEMSHARE_CPU` and the CPU's features;
/// an unknown or unsupported forced path is an error every time it is asked for.
pub fn active() -> Result<Kernels> {
    ACTIVE
        .get_or_init(|| select(std::env::var(ENV).ok().as_deref()).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::config(e.trim_start_matches("configuration: ").to_string()))
}

/// The active path for code below the entry points that already returned [`active`]'s error:
/// the best path when the forced one is invalid.
pub fn current() -> Kernels {
    active().unwrap_or_else(|_| best())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_paths_are_one_line_errors() {
        let e = select(Some("sse9")).unwrap_err().to_string();
        assert!(e.contains("SEMSHARE_CPU=sse9") && e.contains("unknown") && !e.contains('\n'), "{e}");
        for p in CpuPath::ALL {
            match p.kernels() {
                Ok(k) => assert_eq!(select(Some(p.name())).unwrap(), k),
                Err(why) => {
                    let e = select(Some(p.name())).unwrap_err().to_string();
                    assert!(e.contains(p.name()) && e.contains(&why) && !e.contains('\n'), "{e}");
                }
            }
        }
        assert!(CpuPath::Portable.kernels().is_ok());
        assert_eq!(select(None).unwrap(), best());
    }

    /// The permission request reaches Linux and its answer is kept: granted where the CPU has
    /// AMX, refused with the kernel's errno (one line) where it has not.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn the_tile_permission_is_asked_of_linux() {
        match (amx_bits().0, tile_permission()) {
            (true, r) => assert!(r.is_ok(), "{r:?}"),
            (false, Ok(())) => panic!("Linux granted AMX tile data on a CPU without AMX"),
            (false, Err(e)) => assert!(e.contains("arch_prctl errno") && !e.contains('\n'), "{e}"),
        }
        assert_eq!(tile_permission(), tile_permission(), "asked once, the answer kept");
    }

    #[test]
    fn detection_prefers_the_best_path() {
        let want = CpuPath::ALL.into_iter().find(|p| p.kernels().is_ok());
        assert_eq!(best().path(), want.unwrap());
        for p in CpuPath::ALL {
            if p.kernels().is_ok() {
                assert!(p.missing_feature().is_none(), "{p:?}");
            }
        }
    }
}
