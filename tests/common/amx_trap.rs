//! AMX in software, to test the `amx` path (src/backend/cpu/amx.rs) on a CPU without AMX: a
//! SIGILL handler decodes the faulting instruction, runs it on this thread's tile state and
//! steps past it. What runs is the kernel's own machine code, with the registers and
//! addresses the compiler chose; only the tile unit is software. Written from Intel's
//! description of each instruction (the SDM's LDTILECFG, TILELOADD, TILESTORED, TILEZERO,
//! TILERELEASE and TDPBF16PS pages), not from the kernel.
//!
//! Palette 1 only (8 tiles of up to 16 rows × 64 bytes). An instruction it does not know, or
//! one the CPU would refuse (a tile used unconfigured or against its shape), prints one line
//! and aborts, as the CPU's fault would end the process.
//!
//! Include with `#[path = "common/amx_trap.rs"] mod amx_trap;`.

#![allow(dead_code)]

use std::cell::UnsafeCell;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use semshare::backend::cpu::dispatch::{CpuPath, Kernels};

/// Instructions run, by kind (`counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ldtilecfg: u64,
    pub tilezero: u64,
    pub tileloadd: u64,
    pub tilestored: u64,
    pub tdpbf16ps: u64,
    pub tilerelease: u64,
}

static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const LDTILECFG: usize = 0;
const TILEZERO: usize = 1;
const TILELOADD: usize = 2;
const TILESTORED: usize = 3;
const TDPBF16PS: usize = 4;
const TILERELEASE: usize = 5;
static WIDEST_LOAD: AtomicU64 = AtomicU64::new(0);

/// The widest row stride (bytes) a `tileloadd` has used since the last call: 64 or 128 on
/// packed slivers, a row's bytes on A read where it lies.
pub fn take_widest_load() -> u64 {
    WIDEST_LOAD.swap(0, Relaxed)
}

/// What every thread has run so far.
pub fn counts() -> Counts {
    let c = |i: usize| COUNTS[i].load(Relaxed);
    Counts {
        ldtilecfg: c(LDTILECFG),
        tilezero: c(TILEZERO),
        tileloadd: c(TILELOADD),
        tilestored: c(TILESTORED),
        tdpbf16ps: c(TDPBF16PS),
        tilerelease: c(TILERELEASE),
    }
}

/// The `amx` path's kernels with AMX emulated, where this CPU has the rest of the path
/// (AVX-512 F/DQ/BW/VL and BF16, which run natively) but not AMX; why not otherwise.
pub fn kernels() -> Result<Kernels, String> {
    match CpuPath::Amx.missing_feature() {
        None => Err("this CPU has AMX: the path runs on it, not emulated".into()),
        Some("amx-tile" | "amx-bf16") => {
            install();
            // SAFETY: the CPU has every feature of the path but AMX (missing_feature checks
            // them in order, AMX's last), and the handler now emulates AMX's instructions.
            Ok(unsafe { Kernels::assume(CpuPath::Amx) })
        }
        Some(f) => Err(format!("emulating AMX needs {f}, which this CPU lacks")),
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only touches its own thread's
        // state, atomics and the faulting context, and calls write and abort (both
        // async-signal-safe).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigill as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGILL, &sa, std::ptr::null_mut()), 0, "sigaction(SIGILL)");
        }
    });
}

/// One thread's tiles: the configuration and 8 tiles of 16 rows × 64 bytes.
struct Tiles {
    configured: bool,
    rows: [u8; 8],
    colsb: [u16; 8],
    data: [[u8; 1024]; 8],
}

thread_local! {
    static TILES: UnsafeCell<Tiles> =
        const { UnsafeCell::new(Tiles { configured: false, rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] }) };
}

extern "C" fn on_sigill(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted context; the instruction bytes at its RIP are
    // mapped (they just faulted as an illegal instruction, not a page fault).
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let g = &mut uc.uc_mcontext.gregs;
        let ip = g[libc::REG_RIP as usize] as *const u8;
        match TILES.with(|t| emulate(ip, g, &mut *t.get())) {
            Ok(len) => g[libc::REG_RIP as usize] += len as i64,
            Err(why) => die(why),
        }
    }
}

fn die(why: &str) -> ! {
    let msg = ["amx_trap: ", why, "\n"];
    for part in msg {
        // SAFETY: write(2) of a valid buffer; abort ends the process.
        unsafe { libc::write(2, part.as_ptr() as *const libc::c_void, part.len()) };
    }
    unsafe { libc::abort() }
}

/// General register `n` as x86 numbers them (0 rax, 1 rcx, 2 rdx, 3 rbx, 4 rsp, 5 rbp, 6 rsi,
/// 7 rdi, 8–15 r8–r15), from the saved context.
fn reg(g: &[i64; 23], n: u8) -> u64 {
    let at = match n {
        0 => libc::REG_RAX,
        1 => libc::REG_RCX,
        2 => libc::REG_RDX,
        3 => libc::REG_RBX,
        4 => libc::REG_RSP,
        5 => libc::REG_RBP,
        6 => libc::REG_RSI,
        7 => libc::REG_RDI,
        n => libc::REG_R8 + (n as i32 - 8),
    };
    g[at as usize] as u64
}

/// Runs the instruction at `ip`; its length.
///
/// # Safety
/// `ip` points at the faulting instruction; its memory operands are the program's.
unsafe fn emulate(ip: *const u8, g: &[i64; 23], t: &mut Tiles) -> Result<usize, &'static str> {
    let byte = |i: usize| unsafe { *ip.add(i) };
    // Every AMX instruction is VEX, three-byte form: C4, RXB.mmmmm (map 0F38 = 2), W.vvvv.L.pp.
    if byte(0) != 0xc4 {
        return Err("an illegal instruction that is not VEX-encoded (not AMX)");
    }
    let (p1, p2) = (byte(1), byte(2));
    let (r, x, b) = ((!p1 >> 7) & 1, (!p1 >> 6) & 1, (!p1 >> 5) & 1);
    if p1 & 0x1f != 2 || p2 & 0x84 != 0 {
        return Err("a VEX instruction outside map 0F38 W0 L0 (not AMX)");
    }
    let vvvv = (!p2 >> 3) & 0xf;
    let pp = p2 & 3; // 0: none, 1: 66, 2: F3, 3: F2
    let (op, modrm) = (byte(3), byte(4));
    let (md, reg_field, rm) = (modrm >> 6, ((modrm >> 3) & 7) | (r << 3), modrm & 7);
    let tile = |n: u8| if n < 8 { Ok(n as usize) } else { Err("a tile register past tmm7") };
    match (op, pp, md) {
        // TILERELEASE: C4 E2 78 49 C0.
        (0x49, 0, 3) if modrm == 0xc0 => {
            *t = Tiles { configured: false, rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] };
            COUNTS[TILERELEASE].fetch_add(1, Relaxed);
            Ok(5)
        }
        // LDTILECFG m512 / STTILECFG m512 (66).
        (0x49, 0 | 1, 0..=2) if reg_field == 0 => {
            let (addr, index, len) = unsafe { memory(ip, md, rm, x, b, g) }?;
            let cfg = (addr + index) as *mut u8;
            if pp == 0 {
                let mut c = [0u8; 64];
                unsafe { std::ptr::copy_nonoverlapping(cfg, c.as_mut_ptr(), 64) };
                *t = Tiles { configured: false, rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] };
                match c[0] {
                    0 => {}
                    1 if c[1] == 0 => {
                        for i in 0..8 {
                            let (colsb, rows) = (u16::from_le_bytes([c[16 + 2 * i], c[17 + 2 * i]]), c[48 + i]);
                            if rows > 16 || colsb > 64 || (rows == 0) != (colsb == 0) {
                                return Err("LDTILECFG: a tile shape palette 1 does not allow");
                            }
                            (t.rows[i], t.colsb[i]) = (rows, colsb);
                        }
                        t.configured = true;
                    }
                    _ => return Err("LDTILECFG: a palette other than 0 or 1, or a restart row"),
                }
                COUNTS[LDTILECFG].fetch_add(1, Relaxed);
            } else {
                let mut c = [0u8; 64];
                if t.configured {
                    c[0] = 1;
                    for i in 0..8 {
                        c[16 + 2 * i..18 + 2 * i].copy_from_slice(&t.colsb[i].to_le_bytes());
                        c[48 + i] = t.rows[i];
                    }
                }
                unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), cfg, 64) };
            }
            Ok(len)
        }
        // TILEZERO tmm (F2): ModRM 11:tmm:000.
        (0x49, 3, 3) if rm == 0 => {
            let d = tile(reg_field)?;
            shape(t, d)?;
            t.data[d] = [0; 1024];
            COUNTS[TILEZERO].fetch_add(1, Relaxed);
            Ok(5)
        }
        // TILELOADD(T1) tmm, [base + index·scale + disp] (F2, 66) and TILESTORED (F3): the
        // index register scaled is the stride between rows; a SIB byte is required.
        (0x4b, 1..=3, 0..=2) if rm == 4 => {
            let (start, stride, len) = unsafe { memory(ip, md, rm, x, b, g) }?;
            let n = tile(reg_field)?;
            let (rows, colsb) = shape(t, n)?;
            for row in 0..16 {
                let at = (start.wrapping_add(stride.wrapping_mul(row as u64))) as *mut u8;
                let line = &mut t.data[n][row * 64..(row + 1) * 64];
                if pp == 2 {
                    if row < rows {
                        unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), at, colsb) };
                    }
                } else if row < rows {
                    unsafe { std::ptr::copy_nonoverlapping(at as *const u8, line.as_mut_ptr(), colsb) };
                    line[colsb..].fill(0);
                } else {
                    line.fill(0);
                }
            }
            COUNTS[if pp == 2 { TILESTORED } else { TILELOADD }].fetch_add(1, Relaxed);
            if pp != 2 {
                WIDEST_LOAD.fetch_max(stride, Relaxed);
            }
            Ok(len)
        }
        // TDPBF16PS tmm1, tmm2, tmm3 (F3): tmm1 (ModRM.reg) += tmm2 (ModRM.rm) · tmm3 (vvvv),
        // each fp32 element of tmm1 adding its pairs' two products in order, even then odd.
        (0x5c, 2, 3) => {
            let (d, a, bt) = (tile(reg_field)?, tile(rm | (b << 3))?, tile(vvvv)?);
            if d == a || d == bt || a == bt {
                return Err("TDPBF16PS: the same tile twice");
            }
            let ((rd, cd), (ra, ca), (rb, cb)) = (shape(t, d)?, shape(t, a)?, shape(t, bt)?);
            if rd != ra || cd != cb || ca / 4 != rb || ca % 4 != 0 || cd % 4 != 0 {
                return Err("TDPBF16PS: tile shapes that do not multiply");
            }
            let word = |tile: &[u8; 1024], row: usize, col: usize, half: usize| {
                let at = row * 64 + col * 4 + half * 2;
                bf16(u16::from_le_bytes([tile[at], tile[at + 1]]))
            };
            let (ta, tb) = (t.data[a], t.data[bt]);
            let dst = &mut t.data[d];
            for m in 0..rd {
                for k in 0..ca / 4 {
                    for n in 0..cd / 4 {
                        let at = m * 64 + n * 4;
                        let mut acc = f32::from_le_bytes(dst[at..at + 4].try_into().unwrap());
                        for half in 0..2 {
                            acc = flush(acc + flush(word(&ta, m, k, half) * word(&tb, k, n, half)));
                        }
                        dst[at..at + 4].copy_from_slice(&acc.to_le_bytes());
                    }
                }
            }
            COUNTS[TDPBF16PS].fetch_add(1, Relaxed);
            Ok(5)
        }
        _ => Err("an instruction this AMX emulator does not know"),
    }
}

/// (rows, bytes per row) of a configured tile.
fn shape(t: &Tiles, n: usize) -> Result<(usize, usize), &'static str> {
    if !t.configured || t.rows[n] == 0 {
        return Err("a tile instruction on an unconfigured tile");
    }
    Ok((t.rows[n] as usize, t.colsb[n] as usize))
}

/// A bf16 widened to fp32, subnormals as zero (the instruction's DAZ).
fn bf16(bits: u16) -> f32 {
    flush(f32::from_bits((bits as u32) << 16))
}

/// Subnormals to (signed) zero: TDPBF16PS flushes (FTZ) and reads them as zero (DAZ).
fn flush(x: f32) -> f32 {
    if x.is_subnormal() { 0.0f32.copysign(x) } else { x }
}

/// The memory operand of a ModRM whose mod is not 3, from byte 5 on: (base + displacement,
/// index · scale, the instruction's length). RIP-relative counts from the instruction's end.
///
/// # Safety
/// `ip` points at a whole instruction.
unsafe fn memory(
    ip: *const u8,
    md: u8,
    rm: u8,
    x: u8,
    b: u8,
    g: &[i64; 23],
) -> Result<(u64, u64, usize), &'static str> {
    let byte = |i: usize| unsafe { *ip.add(i) };
    let mut len = 5;
    let (mut base, mut index, mut disp32) = (0u64, 0u64, md == 2);
    let mut rip_relative = false;
    if rm == 4 {
        let sib = byte(5);
        len = 6;
        let (scale, idx, bs) = (sib >> 6, ((sib >> 3) & 7) | (x << 3), sib & 7);
        if idx != 4 {
            index = reg(g, idx) << scale;
        }
        if bs == 5 && md == 0 {
            disp32 = true;
        } else {
            base = reg(g, bs | (b << 3));
        }
    } else if rm == 5 && md == 0 {
        (disp32, rip_relative) = (true, true);
    } else {
        base = reg(g, rm | (b << 3));
    }
    let disp = if md == 1 {
        len += 1;
        byte(len - 1) as i8 as i64
    } else if disp32 {
        len += 4;
        i32::from_le_bytes([byte(len - 4), byte(len - 3), byte(len - 2), byte(len - 1)]) as i64
    } else {
        0
    };
    if rip_relative {
        base = ip as u64 + len as u64;
    }
    Ok((base.wrapping_add(disp as u64), index, len))
}
