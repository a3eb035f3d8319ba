//! Runs one kernel launch on the CPU with CUDA's semantics, checking what the hardware does not:
//!
//! - Each block runs on one host thread; its CUDA threads are interpreted one at a time, each
//!   until it reaches `bar.sync`, a warp collective (`shfl.sync`, `vote.sync`, `bar.warp.sync`)
//!   or its end. A barrier releases when every live thread of the block has reached it; a warp
//!   collective completes when every live lane of its mask has reached one. Blocks run in
//!   parallel over the host's cores (global atomics are real atomics).
//! - Lanes that do not exist (a partial last warp) or have exited are not waited for, as on the
//!   hardware; a shuffle that reads one gets a poison value (NaN as f32) where the hardware
//!   gives an undefined one, so a kernel that depends on it fails its twin test.
//! - Every global access must fall inside a live allocation, every shared access inside the
//!   block's shared memory (static + the dynamic size the launch asked for), every access be
//!   naturally aligned. Shared memory and fresh allocations start as NaN bytes.
//! - Shared-memory races: a read of a word another thread wrote, a write of a word another
//!   thread read or wrote, with no barrier in between (or, within one warp, no warp
//!   collective), is an error naming both threads.
//!
//! - A cooperative launch (`Launch::co_resident`) runs every block on its own host thread, as
//!   the hardware keeps every block of one resident, so a grid-wide barrier (blocks spinning
//!   on a global flag) makes progress. `nanosleep` inside such a spin parks the host thread
//!   until the word its last global atomic read changes (`wait_for_change`), so a hundred
//!   waiting blocks cost no CPU.
//!
//! Every error names the kernel, the block, the thread and the PTX instruction.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::ptx::*;

/// What an error-free launch needs besides the kernel.
pub struct Launch<'a> {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared: u64,
    pub params: &'a [u8],
    /// Live device allocations (start, bytes), sorted by start.
    pub allocs: &'a [(u64, u64)],
    /// A cooperative launch: every block runs at once, each on its own host thread.
    pub co_resident: bool,
}

const NONE: u32 = u32::MAX;
/// Readers in more than one warp (ordered only by a block barrier).
const MULTI: u32 = u32::MAX - 1;

/// The reader tag of several threads of warp `w` (a block has at most 32 warps): ordered
/// before a later access of that warp by a warp barrier, as one reader of it would be.
fn warp_readers(w: usize) -> u32 {
    MULTI - 1 - w as u32
}

/// The warp a reader tag names: its thread's, or that of `warp_readers`; None for MULTI
/// (and NONE: no reader).
fn readers_warp(tag: u32) -> Option<usize> {
    match tag {
        NONE | MULTI => None,
        t if t >= warp_readers(31) => Some((MULTI - 1 - t) as usize),
        t => Some(t as usize / 32),
    }
}
/// What a shuffle from a missing lane returns: NaN as f32, absurd as an index.
const POISON: u64 = 0x7fff_ffff;

#[derive(Clone, Copy)]
struct Shadow {
    w_tid: u32,
    w_epoch: u32,
    w_wepoch: u32,
    r_tid: u32,
    r_epoch: u32,
    r_wepoch: u32,
}

const FRESH: Shadow = Shadow { w_tid: NONE, w_epoch: 0, w_wepoch: 0, r_tid: NONE, r_epoch: 0, r_wepoch: 0 };

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Run,
    Barrier,
    Warp,
    Exited,
}

struct Block<'k> {
    k: &'k Kernel,
    nthreads: usize,
    bdim: [u32; 3],
    grid: [u32; 3],
    bidx: [u32; 3],
    regs: Vec<u64>,
    pc: Vec<usize>,
    state: Vec<State>,
    shared: Vec<u8>,
    shadow: Vec<Shadow>,
    epoch: u32,
    warp_epoch: Vec<u32>,
    /// The allocation of the last global access: most accesses of a kernel hit a few buffers.
    last_alloc: std::cell::Cell<(u64, u64)>,
    /// Per thread, the last global atomic: (address, bytes, the value it read), for `Sleep`.
    last_atomic: Vec<(u64, u64, u64)>,
}

pub fn launch(k: &Kernel, l: &Launch) -> Result<(), String> {
    let blocks = l.grid[0] as usize * l.grid[1] as usize * l.grid[2] as usize;
    if blocks == 0 {
        return Ok(());
    }
    let workers = std::env::var("SEMSHARE_EMU_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .clamp(1, 64)
        .min(blocks);
    let workers = if l.co_resident { blocks } else { workers };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let run = || -> Option<(usize, String)> {
        let mut b = Block::new(k, l);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= blocks || failed.load(Ordering::Relaxed) {
                return None;
            }
            let g = l.grid;
            b.bidx = [
                (i % g[0] as usize) as u32,
                ((i / g[0] as usize) % g[1] as usize) as u32,
                (i / (g[0] as usize * g[1] as usize)) as u32,
            ];
            if let Err(e) = b.run(l) {
                failed.store(true, Ordering::Relaxed);
                return Some((i, e));
            }
        }
    };
    let mut errors: Vec<(usize, String)> = if workers == 1 {
        run().into_iter().collect()
    } else {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers).map(|_| s.spawn(run)).collect();
            hs.into_iter()
                .filter_map(|h| h.join().unwrap_or_else(|_| Some((0, "emulator thread panicked".into()))))
                .collect()
        })
    };
    errors.sort_by_key(|(i, _)| *i);
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

fn dim3(v: [u32; 3]) -> String {
    format!("({},{},{})", v[0], v[1], v[2])
}

impl<'k> Block<'k> {
    fn new(k: &'k Kernel, l: &Launch) -> Block<'k> {
        let nthreads = l.block[0] as usize * l.block[1] as usize * l.block[2] as usize;
        let shared_bytes = (k.dynamic_offset + l.dynamic_shared).max(k.static_shared) as usize;
        Block {
            k,
            nthreads,
            bdim: l.block,
            grid: l.grid,
            bidx: [0; 3],
            regs: vec![0; nthreads * k.nregs as usize],
            pc: vec![0; nthreads],
            state: vec![State::Run; nthreads],
            shared: vec![0xff; shared_bytes],
            shadow: vec![FRESH; shared_bytes.div_ceil(4)],
            epoch: 1,
            warp_epoch: vec![0; nthreads.div_ceil(32)],
            last_alloc: std::cell::Cell::new((0, 0)),
            last_atomic: vec![(0, 0, 0); nthreads],
        }
    }

    fn tid3(&self, t: usize) -> [u32; 3] {
        let (x, y) = (self.bdim[0] as usize, self.bdim[1] as usize);
        [(t % x) as u32, ((t / x) % y) as u32, (t / (x * y)) as u32]
    }

    fn where_(&self, t: usize) -> String {
        let pc = self.pc[t].min(self.k.code.len() - 1);
        format!(
            "kernel `{}` block {} thread {}: `{}`",
            self.k.name,
            dim3(self.bidx),
            dim3(self.tid3(t)),
            self.k.code[pc].text
        )
    }

    fn run(&mut self, l: &Launch) -> Result<(), String> {
        // Registers keep the previous block's values: PTX never reads one it has not written
        // (ptxas would refuse), and clearing them per block costs more than the block.
        self.pc.fill(0);
        self.state.fill(State::Run);
        self.shared.fill(0xff);
        self.shadow.fill(FRESH);
        self.epoch = 1;
        self.warp_epoch.fill(0);
        self.last_atomic.fill((0, 0, 0));
        loop {
            for t in 0..self.nthreads {
                if self.state[t] == State::Run {
                    self.step(t, l)?;
                }
            }
            if self.resolve_warps()? {
                continue;
            }
            let live: Vec<usize> = (0..self.nthreads).filter(|&t| self.state[t] != State::Exited).collect();
            if live.is_empty() {
                return Ok(());
            }
            if live.iter().all(|&t| self.state[t] == State::Barrier) {
                self.epoch += 1;
                for &t in &live {
                    self.pc[t] += 1;
                    self.state[t] = State::Run;
                }
                continue;
            }
            // Nothing can move: some threads wait at a barrier, others at a warp collective
            // whose lanes are elsewhere.
            let b = live.iter().find(|&&t| self.state[t] == State::Barrier).copied();
            let w = live.iter().find(|&&t| self.state[t] == State::Warp).copied();
            return Err(match (b, w) {
                (Some(b), Some(w)) => format!(
                    "deadlock: {} waits at a barrier while {} waits for its warp (divergent __syncthreads or warp collective)",
                    self.where_(b),
                    self.where_(w)
                ),
                _ => format!("deadlock in kernel `{}` block {}", self.k.name, dim3(self.bidx)),
            });
        }
    }

    /// Completes the warp collectives whose lanes have all arrived. True when any did.
    fn resolve_warps(&mut self) -> Result<bool, String> {
        let mut any = false;
        let nregs = self.k.nregs as usize;
        for w in 0..self.warp_epoch.len() {
            let mut waiting = [0usize; 32];
            let mut nwait = 0;
            for t in w * 32..((w + 1) * 32).min(self.nthreads) {
                if self.state[t] == State::Warp {
                    waiting[nwait] = t;
                    nwait += 1;
                }
            }
            if nwait == 0 {
                continue;
            }
            let waiting = &waiting[..nwait];
            // Each waiting lane's mask: every live lane in it must be waiting too.
            let mut masks = [0u32; 32];
            let mut ready = true;
            for &t in waiting {
                let mask = match &self.k.code[self.pc[t]].op {
                    Op::Shfl { mask, .. } | Op::Vote { mask, .. } | Op::BarWarp { mask } => self.val(t, mask) as u32,
                    Op::Mma { .. } => u32::MAX,
                    _ => 0,
                };
                if mask & (1 << (t % 32)) == 0 {
                    return Err(format!("{}: the calling lane is not in the member mask {mask:#010x}", self.where_(t)));
                }
                masks[t % 32] = mask;
                for lane in 0..32 {
                    let u = w * 32 + lane;
                    if mask & (1 << lane) != 0
                        && u < self.nthreads
                        && self.state[u] != State::Exited
                        && self.state[u] != State::Warp
                    {
                        ready = false;
                    }
                }
            }
            if !ready {
                continue;
            }
            // Every waiting lane at an mma: the whole warp must be at that one (else an error).
            // Lanes at an mma beside lanes at another collective wait on while that one
            // completes (a lane that shuffles alone first reaches the mma after it).
            let at_mma = |t: usize| matches!(self.k.code[self.pc[t]].op, Op::Mma { .. });
            if waiting.iter().all(|&t| at_mma(t)) {
                self.mma_m16n8k16(w, waiting)?;
                self.warp_epoch[w] += 1;
                any = true;
                continue;
            }
            // Results first (every lane reads the others' values before any writes).
            let mut results = [(0usize, None::<(u32, u64)>, None::<(u32, u64)>); 32];
            let mut nres = 0;
            for &t in waiting {
                let lane = (t % 32) as u32;
                let pc = self.pc[t];
                let present = |u: usize| u < self.nthreads && self.state[u] == State::Warp && self.pc[u] == pc;
                match &self.k.code[pc].op {
                    Op::Shfl { mode, d, p, a: _, b, c, .. } => {
                        let bval = self.val(t, b) as u32 & 31;
                        let cval = self.val(t, c) as u32;
                        let seg = (cval >> 8) & 31;
                        let maxl = (lane & seg) | (cval & 31 & !seg);
                        let minl = lane & seg;
                        let (j, pv) = match mode {
                            ShflMode::Up => {
                                let j = lane as i32 - bval as i32;
                                (j, j >= maxl as i32)
                            }
                            ShflMode::Down => {
                                let j = (lane + bval) as i32;
                                (j, j <= maxl as i32)
                            }
                            ShflMode::Bfly => {
                                let j = (lane ^ bval) as i32;
                                (j, j <= maxl as i32)
                            }
                            ShflMode::Idx => {
                                let j = (minl | (bval & !seg)) as i32;
                                (j, j <= maxl as i32)
                            }
                        };
                        let j = if pv { j as u32 } else { lane };
                        let src = w * 32 + j as usize;
                        let v = if masks[t % 32] & (1 << j) != 0 && present(src) {
                            match &self.k.code[pc].op {
                                Op::Shfl { a, .. } => self.val(src, a) & 0xffff_ffff,
                                _ => POISON,
                            }
                        } else {
                            POISON
                        };
                        results[nres] = (t, Some((*d, v)), p.map(|p| (p, pv as u64)));
                        nres += 1;
                    }
                    Op::Vote { mode, d, a, negate, .. } => {
                        let mask = masks[t % 32];
                        let mut ballot = 0u32;
                        let mut members = 0u32;
                        for l2 in 0..32u32 {
                            let u = w * 32 + l2 as usize;
                            if mask & (1 << l2) != 0 && present(u) {
                                members |= 1 << l2;
                                if (self.val(u, a) & 1 != 0) != *negate {
                                    ballot |= 1 << l2;
                                }
                            }
                        }
                        let v = match mode {
                            VoteMode::Ballot => ballot as u64,
                            VoteMode::All => (ballot == members) as u64,
                            VoteMode::Any => (ballot != 0) as u64,
                            VoteMode::Uni => (ballot == members || ballot == 0) as u64,
                        };
                        results[nres] = (t, Some((*d, v)), None);
                        nres += 1;
                    }
                    Op::Mma { .. } => {}
                    _ => {
                        results[nres] = (t, None, None);
                        nres += 1;
                    }
                }
            }
            for &(t, d, p) in &results[..nres] {
                let base = t * nregs;
                if let Some((r, v)) = d {
                    self.regs[base + r as usize] = v;
                }
                if let Some((r, v)) = p {
                    self.regs[base + r as usize] = v;
                }
                self.pc[t] += 1;
                self.state[t] = State::Run;
            }
            self.warp_epoch[w] += 1;
            any = true;
        }
        Ok(any)
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` for warp `w`, every waiting lane
    /// at an mma (all 32 at this one, or an error). Fragments as the PTX ISA assigns them (g = lane / 4, t = lane % 4; a register's
    /// low half is its first element):
    /// - A (16 × 16, row): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
    ///   a3 = A[g+8][2t+8, 2t+9];
    /// - B (16 × 8, col): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
    /// - C, D (16 × 8, f32): c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
    ///
    /// The hardware's order of the f32 accumulation is unspecified. Here each product (exact
    /// in f64, as bf16 × bf16 is) and C are summed exactly enough in f64 and rounded once, so a
    /// kernel's test can rely on a bound, not on an order.
    fn mma_m16n8k16(&mut self, w: usize, waiting: &[usize]) -> Result<(), String> {
        let t0 = waiting[0];
        let pc = self.pc[t0];
        let here = waiting.iter().filter(|&&t| self.pc[t] == pc).count();
        if here != 32 {
            return Err(self.err(t0, format!("mma.sync needs all 32 lanes of warp {w} at the same mma ({here} are)")));
        }
        let Op::Mma { d, a, b, c } = self.k.code[pc].op.clone() else { unreachable!("checked by the caller") };
        let (mut am, mut bm, mut cm) = ([[0f64; 16]; 16], [[0f64; 8]; 16], [[0f64; 8]; 16]);
        let half = |v: u64, hi: bool| bf16_to_f32(if hi { v >> 16 } else { v }) as f64;
        for &t in waiting {
            let lane = t % 32;
            let (g, q) = (lane / 4, 2 * (lane % 4));
            for (i, (row, col)) in [(g, q), (g + 8, q), (g, q + 8), (g + 8, q + 8)].into_iter().enumerate() {
                let v = self.val(t, &a[i]);
                am[row][col] = half(v, false);
                am[row][col + 1] = half(v, true);
            }
            for (i, k) in [q, q + 8].into_iter().enumerate() {
                let v = self.val(t, &b[i]);
                bm[k][g] = half(v, false);
                bm[k + 1][g] = half(v, true);
            }
            for (i, (row, col)) in [(g, q), (g, q + 1), (g + 8, q), (g + 8, q + 1)].into_iter().enumerate() {
                cm[row][col] = f32::from_bits(self.val(t, &c[i]) as u32) as f64;
            }
        }
        let nregs = self.k.nregs as usize;
        for &t in waiting {
            let lane = t % 32;
            let (g, q) = (lane / 4, 2 * (lane % 4));
            for (i, (row, col)) in [(g, q), (g, q + 1), (g + 8, q), (g + 8, q + 1)].into_iter().enumerate() {
                let sum: f64 = cm[row][col] + (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f64>();
                self.regs[t * nregs + d[i] as usize] = (sum as f32).to_bits() as u64;
            }
            self.pc[t] += 1;
            self.state[t] = State::Run;
        }
        Ok(())
    }

    #[inline(never)]
    fn special(&self, t: usize, s: Special) -> u64 {
        let tid = self.tid3(t);
        let lane = (t % 32) as u64;
        match s {
            Special::Tid(d) => tid[d as usize] as u64,
            Special::Ntid(d) => self.bdim[d as usize] as u64,
            Special::Ctaid(d) => self.bidx[d as usize] as u64,
            Special::Nctaid(d) => self.grid[d as usize] as u64,
            Special::LaneId => lane,
            Special::WarpId => (t / 32) as u64,
            Special::NWarpId => self.nthreads.div_ceil(32) as u64,
            Special::LaneMaskEq => 1 << lane,
            Special::LaneMaskLt => (1u64 << lane) - 1,
            Special::LaneMaskLe => (1u64 << (lane + 1)) - 1,
            Special::LaneMaskGt => (!((1u64 << (lane + 1)) - 1)) & 0xffff_ffff,
            Special::LaneMaskGe => (!((1u64 << lane) - 1)) & 0xffff_ffff,
            Special::Clock | Special::Clock64 => 0,
            Special::SmId => 0,
        }
    }

    #[inline(always)]
    fn val(&self, t: usize, s: &Src) -> u64 {
        match *s {
            Src::Reg(r) => self.regs[t * self.k.nregs as usize + r as usize],
            Src::Imm(v) => v,
            Src::Special(sp) => self.special(t, sp),
        }
    }

    fn err(&self, t: usize, what: String) -> String {
        format!("{}: {what}", self.where_(t))
    }

    /// Global range check: inside one live allocation.
    #[inline]
    fn check_global(&self, t: usize, l: &Launch, addr: u64, bytes: u64, what: &str) -> Result<(), String> {
        let (s, n) = self.last_alloc.get();
        if addr >= s && addr.saturating_add(bytes) <= s + n {
            return Ok(());
        }
        self.check_global_slow(t, l, addr, bytes, what)
    }

    fn check_global_slow(&self, t: usize, l: &Launch, addr: u64, bytes: u64, what: &str) -> Result<(), String> {
        let i = l.allocs.partition_point(|&(s, _)| s <= addr);
        if i > 0 {
            let (s, n) = l.allocs[i - 1];
            if addr >= s && addr.saturating_add(bytes) <= s + n {
                self.last_alloc.set((s, n));
                return Ok(());
            }
            if addr < s + n {
                return Err(self.err(
                    t,
                    format!(
                        "global {what} of {bytes} bytes at {addr:#x} runs {} bytes past the end of the {n}-byte allocation at {s:#x} (index {} of its 4-byte elements)",
                        addr + bytes - (s + n),
                        (addr - s) / 4
                    ),
                ));
            }
            return Err(self.err(
                t,
                format!(
                    "global {what} of {bytes} bytes at {addr:#x} is outside every allocation: {} bytes past the end of the {n}-byte allocation at {s:#x} (element {} of {})",
                    addr - (s + n),
                    (addr - s) / 4,
                    n / 4
                ),
            ));
        }
        Err(self.err(t, format!("global {what} of {bytes} bytes at {addr:#x} is outside every allocation")))
    }

    /// Which static shared variable `off` falls in (or just after), for messages.
    fn shared_var_at(&self, off: u64) -> String {
        match self.k.shared_vars.iter().rfind(|v| v.offset <= off) {
            Some(v) if off < v.offset + v.bytes => {
                format!(" (in `{}`, {} bytes at offset {})", v.name, v.bytes, v.offset)
            }
            Some(v) => format!(
                " ({} bytes past the end of `{}`, {} bytes at offset {})",
                off - (v.offset + v.bytes),
                v.name,
                v.bytes,
                v.offset
            ),
            None => String::new(),
        }
    }

    fn check_shared(&self, t: usize, off: u64, bytes: u64, what: &str) -> Result<(), String> {
        if off.saturating_add(bytes) <= self.shared.len() as u64 {
            return Ok(());
        }
        let dynamic = self.shared.len() as u64 - self.k.dynamic_offset.min(self.shared.len() as u64);
        Err(self.err(
            t,
            format!(
                "shared {what} of {bytes} bytes at offset {off}{} is out of bounds: the block has {} bytes of shared memory ({} static, {dynamic} dynamic)",
                self.shared_var_at(off),
                self.shared.len(),
                self.k.static_shared
            ),
        ))
    }

    fn ordered(&self, prev: u32, prev_epoch: u32, prev_wepoch: u32, t: usize) -> bool {
        prev == t as u32
            || prev_epoch != self.epoch
            || (readers_warp(prev) == Some(t / 32) && self.warp_epoch[t / 32] != prev_wepoch)
    }

    /// `t` did `now` to a word that `other` did `before` with no barrier in between.
    fn race(&self, t: usize, other: u32, off: u64, now: &str, before: &str) -> String {
        let who = match readers_warp(other) {
            None => "several other threads".to_string(),
            Some(w) if other >= warp_readers(31) => format!("several threads of warp {w}"),
            Some(_) => format!("thread {}", dim3(self.tid3(other as usize))),
        };
        self.err(
            t,
            format!(
                "shared-memory race: this thread {now} shared offset {off}{} that {who} {before} with no __syncthreads() in between",
                self.shared_var_at(off)
            ),
        )
    }

    fn shared_read(&mut self, t: usize, off: u64, bytes: u64) -> Result<u64, String> {
        self.check_shared(t, off, bytes, "load")?;
        let wep = self.warp_epoch[t / 32];
        for w in (off / 4)..(off + bytes).div_ceil(4) {
            let s = self.shadow[w as usize];
            if s.w_tid != NONE && s.w_tid != t as u32 && !self.ordered(s.w_tid, s.w_epoch, s.w_wepoch, t) {
                return Err(self.race(t, s.w_tid, w * 4, "reads", "wrote"));
            }
            let s = &mut self.shadow[w as usize];
            if s.r_tid == NONE || s.r_epoch != self.epoch {
                *s = Shadow { r_tid: t as u32, r_epoch: self.epoch, r_wepoch: wep, ..*s };
            } else if readers_warp(s.r_tid) == Some(t / 32) {
                // This warp's readers so far and this one: a later access by the warp must
                // come after a warp barrier newer than the newest read.
                if s.r_tid != t as u32 {
                    s.r_tid = warp_readers(t / 32);
                }
                s.r_wepoch = wep;
            } else {
                s.r_tid = MULTI;
            }
        }
        let mut v = [0u8; 8];
        v[..bytes as usize].copy_from_slice(&self.shared[off as usize..(off + bytes) as usize]);
        Ok(u64::from_le_bytes(v))
    }

    fn shared_write(&mut self, t: usize, off: u64, bytes: u64, v: u64) -> Result<(), String> {
        self.check_shared(t, off, bytes, "store")?;
        self.shared_track_write(t, off, bytes)?;
        self.shared[off as usize..(off + bytes) as usize].copy_from_slice(&v.to_le_bytes()[..bytes as usize]);
        Ok(())
    }

    fn shared_track_write(&mut self, t: usize, off: u64, bytes: u64) -> Result<(), String> {
        let wep = self.warp_epoch[t / 32];
        for w in (off / 4)..(off + bytes).div_ceil(4) {
            let s = self.shadow[w as usize];
            if s.w_tid != NONE && s.w_tid != t as u32 && !self.ordered(s.w_tid, s.w_epoch, s.w_wepoch, t) {
                return Err(self.race(t, s.w_tid, w * 4, "writes", "wrote"));
            }
            if s.r_tid != NONE
                && s.r_tid != t as u32
                && s.r_epoch == self.epoch
                && !self.ordered(s.r_tid, s.r_epoch, s.r_wepoch, t)
            {
                return Err(self.race(t, s.r_tid, w * 4, "writes", "read"));
            }
            self.shadow[w as usize] =
                Shadow { w_tid: t as u32, w_epoch: self.epoch, w_wepoch: wep, r_tid: NONE, r_epoch: 0, r_wepoch: 0 };
        }
        Ok(())
    }

    fn addr(&self, t: usize, a: &Addr) -> u64 {
        let base = match a.base {
            Some(r) => self.regs[t * self.k.nregs as usize + r as usize],
            None => 0,
        };
        base.wrapping_add(a.offset as u64)
    }

    /// Resolves a space and address to (is_shared, address-or-offset).
    fn resolve(&self, space: Space, addr: u64) -> (bool, u64) {
        match space {
            Space::Shared => (true, addr & 0xffff_ffff),
            Space::Generic if (SHARED_WINDOW..SHARED_WINDOW + (1 << 32)).contains(&addr) => {
                (true, addr - SHARED_WINDOW)
            }
            _ => (false, addr),
        }
    }

    fn load(&mut self, t: usize, l: &Launch, space: Space, addr: u64, bytes: u64) -> Result<u64, String> {
        if space == Space::Param {
            let end = addr.saturating_add(bytes);
            if end > l.params.len() as u64 {
                return Err(
                    self.err(t, format!("parameter read at byte {addr} past the {} parameter bytes", l.params.len()))
                );
            }
            let mut v = [0u8; 8];
            v[..bytes as usize].copy_from_slice(&l.params[addr as usize..end as usize]);
            return Ok(u64::from_le_bytes(v));
        }
        if !addr.is_multiple_of(bytes) {
            return Err(self.err(t, format!("misaligned {bytes}-byte load at {addr:#x}")));
        }
        let (sh, a) = self.resolve(space, addr);
        if sh {
            return self.shared_read(t, a, bytes);
        }
        self.check_global(t, l, a, bytes, "load")?;
        // SAFETY: [a, a + bytes) lies inside a live allocation of this process (checked above).
        unsafe {
            Ok(match bytes {
                1 => std::ptr::read_volatile(a as *const u8) as u64,
                2 => std::ptr::read_volatile(a as *const u16) as u64,
                4 => std::ptr::read_volatile(a as *const u32) as u64,
                _ => std::ptr::read_volatile(a as *const u64),
            })
        }
    }

    fn store(&mut self, t: usize, l: &Launch, space: Space, addr: u64, bytes: u64, v: u64) -> Result<(), String> {
        if space == Space::Param {
            return Err(self.err(t, "store to parameter space".into()));
        }
        if !addr.is_multiple_of(bytes) {
            return Err(self.err(t, format!("misaligned {bytes}-byte store at {addr:#x}")));
        }
        let (sh, a) = self.resolve(space, addr);
        if sh {
            return self.shared_write(t, a, bytes, v);
        }
        self.check_global(t, l, a, bytes, "store")?;
        // SAFETY: as in `load`.
        unsafe {
            match bytes {
                1 => std::ptr::write_volatile(a as *mut u8, v as u8),
                2 => std::ptr::write_volatile(a as *mut u16, v as u16),
                4 => std::ptr::write_volatile(a as *mut u32, v as u32),
                _ => std::ptr::write_volatile(a as *mut u64, v),
            }
        }
        Ok(())
    }

    /// Interprets thread `t` until it blocks (barrier, warp collective) or exits.
    fn step(&mut self, t: usize, l: &Launch) -> Result<(), String> {
        let k = self.k;
        let nregs = k.nregs as usize;
        let base = t * nregs;
        // Register reads and writes without bounds checks: the decoder only emits indices of
        // declared registers (< nregs), and `base` is this thread's row of `regs`.
        macro_rules! rd {
            ($s:expr) => {{
                let s: &Src = $s;
                match *s {
                    // SAFETY: see above.
                    Src::Reg(r) => unsafe { *self.regs.get_unchecked(base + r as usize) },
                    Src::Imm(v) => v,
                    Src::Special(sp) => self.special(t, sp),
                }
            }};
        }
        macro_rules! wr {
            ($r:expr, $v:expr) => {{
                let v = $v;
                // SAFETY: see above.
                unsafe { *self.regs.get_unchecked_mut(base + $r as usize) = v };
            }};
        }
        let mut budget: u64 = 1 << 34;
        // The pc lives in a local; `self.pc[t]` is brought up to date before anything that can
        // fail (memory operations name the instruction) and whenever the thread stops.
        let mut pc = self.pc[t];
        loop {
            budget -= 1;
            if budget == 0 {
                self.pc[t] = pc;
                return Err(self.err(t, "no barrier or exit after 2^34 instructions (an endless loop?)".into()));
            }
            let inst = &k.code[pc];
            if let Some((p, neg)) = inst.guard {
                let v = self.regs[t * nregs + p as usize] & 1 != 0;
                if v == neg {
                    pc += 1;
                    continue;
                }
            }
            match &inst.op {
                Op::Mov { ty, d, a } => {
                    let v = mask(*ty, rd!(&a));
                    wr!(*d, v);
                }
                Op::Pack { part_bits, d, parts } => {
                    let mut v = 0u64;
                    for (i, p) in parts.iter().enumerate() {
                        v |= (rd!(&p) & ones(*part_bits)) << (i as u32 * part_bits);
                    }
                    wr!(*d, v);
                }
                Op::Unpack { part_bits, ds, a } => {
                    let v = rd!(&a);
                    for (i, d) in ds.iter().enumerate() {
                        if let Some(d) = d {
                            wr!(*d, (v >> (i as u32 * part_bits)) & ones(*part_bits));
                        }
                    }
                }
                Op::Arith { op, ty, ftz, d, a, b } => {
                    let v = arith(*op, *ty, *ftz, rd!(&a), rd!(&b));
                    wr!(*d, v);
                }
                Op::ArithRnd { op, ty, rnd, d, a, b } => {
                    let (x, y) = (rd!(&a), rd!(&b));
                    let v = if *ty == Ty::F32 {
                        let (x, y) = (f32::from_bits(x as u32) as f64, f32::from_bits(y as u32) as f64);
                        let exact = match op {
                            AOp::Add => x + y,
                            AOp::Sub => x - y,
                            _ => x * y,
                        };
                        round_f32(exact, *rnd).to_bits() as u64
                    } else {
                        arith(*op, *ty, false, x, y)
                    };
                    wr!(*d, v);
                }
                Op::Unary { op, ty, ftz, d, a } => {
                    let v = unary(*op, *ty, *ftz, rd!(&a));
                    wr!(*d, v);
                }
                Op::Fma { ty, rnd, ftz, sat, d, a, b, c } => {
                    let (x, y, z) = (rd!(&a), rd!(&b), rd!(&c));
                    let v = if *ty == Ty::F64 {
                        f64::from_bits(x).mul_add(f64::from_bits(y), f64::from_bits(z)).to_bits()
                    } else {
                        let (x, y, z) = (f(x, *ftz), f(y, *ftz), f(z, *ftz));
                        let mut r = if *rnd == Rnd::Rn {
                            x.mul_add(y, z)
                        } else {
                            round_f32(x as f64 * y as f64 + z as f64, *rnd)
                        };
                        if *sat {
                            r = saturate(r);
                        }
                        flush(r, *ftz).to_bits() as u64
                    };
                    wr!(*d, v);
                }
                Op::Mad { mode, ty, d, a, b, c } => {
                    let p = arith(*mode, *ty, false, rd!(&a), rd!(&b));
                    let rty = if *mode == AOp::MulWide { wide(*ty) } else { *ty };
                    let v = arith(AOp::Add, rty, false, p, rd!(&c));
                    wr!(*d, v);
                }
                Op::Setp { cmp, ty, ftz, d, dn, a, b, comb } => {
                    let r = compare(*cmp, *ty, *ftz, rd!(&a), rd!(&b));
                    let (mut p, mut q) = (r, !r);
                    if let Some((bop, c, neg)) = comb {
                        let c = (rd!(&c) & 1 != 0) != *neg;
                        let f = |x: bool| match bop {
                            BoolOp::And => x && c,
                            BoolOp::Or => x || c,
                            BoolOp::Xor => x ^ c,
                        };
                        p = f(p);
                        q = f(q);
                    }
                    wr!(*d, p as u64);
                    if let Some(dn) = dn {
                        wr!(*dn, q as u64);
                    }
                }
                Op::Selp { ty, d, a, b, p } => {
                    let v = if rd!(&p) & 1 != 0 { rd!(&a) } else { rd!(&b) };
                    wr!(*d, mask(*ty, v));
                }
                Op::Lop3 { d, a, b, c, lut } => {
                    let v = lop3(rd!(a), rd!(b), rd!(c), rd!(lut));
                    wr!(*d, v);
                }
                Op::Shf { left, clamp, d, a, b, n } => {
                    let wide = ((rd!(b) & 0xffff_ffff) << 32) | (rd!(a) & 0xffff_ffff);
                    let n = rd!(n) & 0xffff_ffff;
                    let n = if *clamp { n.min(32) } else { n & 31 };
                    let v = if *left { (wide << n) >> 32 } else { wide >> n } & 0xffff_ffff;
                    wr!(*d, v);
                }
                Op::Prmt { d, a, b, sel } => {
                    let bytes = ((rd!(b) & 0xffff_ffff) << 32) | (rd!(a) & 0xffff_ffff);
                    let s = rd!(sel);
                    let mut v = 0u64;
                    for i in 0..4 {
                        let nib = (s >> (4 * i)) & 0xf;
                        let byte = (bytes >> (8 * (nib & 7))) & 0xff;
                        // Bit 3 of the selector: the byte's sign bit, replicated.
                        let byte = if nib & 8 != 0 {
                            if byte & 0x80 != 0 {
                                0xff
                            } else {
                                0
                            }
                        } else {
                            byte
                        };
                        v |= byte << (8 * i);
                    }
                    wr!(*d, v);
                }
                Op::Bfind { ty, shiftamt, d, a } => {
                    let bits = ty.bits();
                    let x = rd!(a) & ones(bits);
                    // Signed: the most significant bit that differs from the sign.
                    let x = if ty.signed() && (x >> (bits - 1)) & 1 == 1 { !x & ones(bits) } else { x };
                    let v = if x == 0 {
                        0xffff_ffff
                    } else {
                        let pos = 63 - x.leading_zeros() as u64;
                        if *shiftamt {
                            bits as u64 - 1 - pos
                        } else {
                            pos
                        }
                    };
                    wr!(*d, v);
                }
                Op::Testp { ty, what, d, a } => {
                    let x = rd!(a);
                    let f = if *ty == Ty::F64 { f64::from_bits(x) } else { f32::from_bits(x as u32) as f64 };
                    let sub = if *ty == Ty::F64 { f.is_subnormal() } else { f32::from_bits(x as u32).is_subnormal() };
                    let v = match what {
                        0 => f.is_finite(),
                        1 => f.is_infinite(),
                        2 => !f.is_nan(),
                        3 => f.is_nan(),
                        4 => f.is_finite() && f != 0.0 && !sub,
                        _ => sub,
                    };
                    wr!(*d, v as u64);
                }
                Op::Bfe { ty, d, a, pos, len } => {
                    let v = bit_extract(*ty, rd!(a), rd!(pos), rd!(len));
                    wr!(*d, v);
                }
                Op::Bfi { ty, d, a, b, pos, len } => {
                    let v = bit_insert(*ty, rd!(a), rd!(b), rd!(pos), rd!(len));
                    wr!(*d, v);
                }
                Op::Cvt { dty, sty, rnd, sat, ftz, d, a } => {
                    let v = convert(*dty, *sty, *rnd, *sat, *ftz, rd!(&a));
                    wr!(*d, v);
                }
                Op::Cvta { to_generic, space, d, a } => {
                    let v = rd!(&a);
                    let r = match (space, to_generic) {
                        (Space::Shared, true) => (v & 0xffff_ffff) + SHARED_WINDOW,
                        (Space::Shared, false) => v.wrapping_sub(SHARED_WINDOW) & 0xffff_ffff,
                        _ => v,
                    };
                    wr!(*d, r);
                }
                Op::Ld { space, ty, ds, addr } => {
                    self.pc[t] = pc;
                    let bytes = ty.bytes() as u64;
                    let a0 = self.addr(t, addr);
                    let total = bytes * ds.len() as u64;
                    if *space != Space::Param && !a0.is_multiple_of(total) {
                        return Err(self.err(t, format!("misaligned {total}-byte vector load at {a0:#x}")));
                    }
                    for (i, dst) in ds.iter().enumerate() {
                        let v = self.load(t, l, *space, a0 + i as u64 * bytes, bytes)?;
                        if let Some(dst) = dst {
                            wr!(*dst, if ty.signed() { sext(v, ty.bits()) } else { v });
                        }
                    }
                }
                Op::St { space, ty, addr, srcs } => {
                    self.pc[t] = pc;
                    let bytes = ty.bytes() as u64;
                    let a0 = self.addr(t, addr);
                    let total = bytes * srcs.len() as u64;
                    if !a0.is_multiple_of(total) {
                        return Err(self.err(t, format!("misaligned {total}-byte vector store at {a0:#x}")));
                    }
                    for (i, s) in srcs.iter().enumerate() {
                        let v = rd!(&s);
                        self.store(t, l, *space, a0 + i as u64 * bytes, bytes, v)?;
                    }
                }
                Op::Atom { space, op, ty, d, addr, b, c } => {
                    self.pc[t] = pc;
                    let a = self.addr(t, addr);
                    let bytes = ty.bytes() as u64;
                    if !a.is_multiple_of(bytes) {
                        return Err(self.err(t, format!("misaligned {bytes}-byte atomic at {a:#x}")));
                    }
                    let (bv, cv) = (rd!(&b), c.map(|c| rd!(&c)).unwrap_or(0));
                    let (sh, a) = self.resolve(*space, a);
                    let old = if sh {
                        self.check_shared(t, a, bytes, "atomic")?;
                        let mut buf = [0u8; 8];
                        buf[..bytes as usize].copy_from_slice(&self.shared[a as usize..(a + bytes) as usize]);
                        let old = u64::from_le_bytes(buf);
                        let new = atomic_op(*op, *ty, old, bv, cv);
                        self.shared[a as usize..(a + bytes) as usize]
                            .copy_from_slice(&new.to_le_bytes()[..bytes as usize]);
                        old
                    } else {
                        self.check_global(t, l, a, bytes, "atomic")?;
                        let old = global_atomic(*op, *ty, a, bv, cv);
                        self.last_atomic[t] = (a, bytes, old);
                        old
                    };
                    if let Some(d) = d {
                        wr!(*d, old);
                    }
                }
                Op::CpAsync { dst, src, bytes, src_bytes } => {
                    self.pc[t] = pc;
                    let (da, sa) = (self.addr(t, dst), self.addr(t, src));
                    let n = *bytes as u64;
                    let fill = src_bytes.map(|s| rd!(&s).min(n)).unwrap_or(n);
                    if da % n != 0 || sa % n != 0 {
                        return Err(self.err(t, format!("misaligned {n}-byte cp.async ({sa:#x} -> shared {da})")));
                    }
                    let (_, off) = self.resolve(Space::Shared, da);
                    self.check_shared(t, off, n, "cp.async store")?;
                    if fill > 0 {
                        self.check_global(t, l, sa, fill, "cp.async load")?;
                    }
                    self.shared_track_write(t, off, n)?;
                    for i in 0..n {
                        // SAFETY: the first `fill` source bytes were checked above.
                        let byte = if i < fill { unsafe { std::ptr::read_volatile((sa + i) as *const u8) } } else { 0 };
                        self.shared[(off + i) as usize] = byte;
                    }
                }
                Op::Bra { target } => {
                    pc = *target;
                    continue;
                }
                Op::Bar => {
                    self.pc[t] = pc;
                    self.state[t] = State::Barrier;
                    return Ok(());
                }
                Op::BarWarp { .. } | Op::Shfl { .. } | Op::Vote { .. } | Op::Mma { .. } => {
                    self.pc[t] = pc;
                    self.state[t] = State::Warp;
                    return Ok(());
                }
                Op::Exit => {
                    self.pc[t] = pc;
                    self.state[t] = State::Exited;
                    return Ok(());
                }
                Op::Sleep => {
                    let (a, bytes, seen) = self.last_atomic[t];
                    if bytes == 0 {
                        std::thread::yield_now();
                    } else {
                        wait_for_change(a, bytes, seen);
                    }
                }
                Op::Nop => {}
            }
            pc += 1;
        }
    }
}

/// PTX `lop3`: bit i of the result is bit `(a_i << 2 | b_i << 1 | c_i)` of the truth table
/// (the table of `F(0xF0, 0xCC, 0xAA)`).
fn lop3(a: u64, b: u64, c: u64, lut: u64) -> u64 {
    let mut v = 0u64;
    for i in 0..8 {
        if (lut >> i) & 1 == 1 {
            let pick = |x: u64, bit: u64| if i & bit != 0 { x } else { !x };
            v |= pick(a, 4) & pick(b, 2) & pick(c, 1);
        }
    }
    v & 0xffff_ffff
}

/// PTX `bfe`: position and length are the low 8 bits of their operands; a field past the
/// register's top is cut there; signed types sign-extend from the field's top bit.
fn bit_extract(ty: Ty, a: u64, pos: u64, len: u64) -> u64 {
    let bits = ty.bits() as u64;
    let (pos, len) = (pos & 0xff, len & 0xff);
    let a = a & ones(bits as u32);
    if len == 0 {
        return 0;
    }
    let field = if pos >= bits { 0 } else { (a >> pos) & ones(len.min(64) as u32) };
    if ty.signed() {
        let top = (pos + len - 1).min(bits - 1);
        let sign = (a >> top) & 1 == 1;
        let width = len.min(bits.saturating_sub(pos)) as u32;
        let ext = if sign && width < 64 { field | !ones(width) } else { field };
        ext & ones(bits as u32)
    } else {
        field & ones(bits as u32)
    }
}

/// PTX `bfi`: `b` with `len` low bits of `a` written from bit `pos`; nothing past the top.
fn bit_insert(ty: Ty, a: u64, b: u64, pos: u64, len: u64) -> u64 {
    let bits = ty.bits() as u64;
    let (pos, len) = (pos & 0xff, len & 0xff);
    let b = b & ones(bits as u32);
    if len == 0 || pos >= bits {
        return b;
    }
    let mask = ones(len.min(bits - pos) as u32) << pos;
    ((b & !mask) | ((a << pos) & mask)) & ones(bits as u32)
}

#[inline]
fn ones(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[inline]
fn mask(ty: Ty, v: u64) -> u64 {
    v & ones(ty.bits())
}

#[inline]
fn sext(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        let s = 64 - bits;
        (((v << s) as i64) >> s) as u64
    }
}

#[inline]
fn flush(x: f32, ftz: bool) -> f32 {
    if ftz && x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

#[inline]
fn f(v: u64, ftz: bool) -> f32 {
    flush(f32::from_bits(v as u32), ftz)
}

fn saturate(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// `exact` rounded to f32 in direction `rnd` (the f64 value stands in for the exact result).
fn round_f32(exact: f64, rnd: Rnd) -> f32 {
    let r = exact as f32;
    if r.is_nan() || r.is_infinite() && exact.is_infinite() {
        return r;
    }
    let rd = r as f64;
    match rnd {
        Rnd::Rm | Rnd::Rmi if rd > exact => r.next_down(),
        Rnd::Rp | Rnd::Rpi if rd < exact => r.next_up(),
        Rnd::Rz | Rnd::Rzi if rd.abs() > exact.abs() => {
            if r > 0.0 {
                r.next_down()
            } else {
                r.next_up()
            }
        }
        _ => r,
    }
}

fn arith(op: AOp, ty: Ty, ftz: bool, a: u64, b: u64) -> u64 {
    match ty {
        Ty::F32 => {
            let (x, y) = (f(a, ftz), f(b, ftz));
            let r = match op {
                AOp::Add => x + y,
                AOp::Sub => x - y,
                AOp::MulLo => x * y,
                AOp::Div => x / y,
                AOp::Min => x.min(y),
                AOp::Max => x.max(y),
                // copysign d, a, b: b with the sign of a.
                AOp::CopySign => y.copysign(x),
                AOp::Rem => x % y,
                _ => return mask(ty, int_arith(op, Ty::B32, a, b)),
            };
            flush(r, ftz).to_bits() as u64
        }
        Ty::F64 => {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            let r = match op {
                AOp::Add => x + y,
                AOp::Sub => x - y,
                AOp::MulLo => x * y,
                AOp::Div => x / y,
                AOp::Min => x.min(y),
                AOp::Max => x.max(y),
                AOp::CopySign => y.copysign(x),
                AOp::Rem => x % y,
                _ => return int_arith(op, Ty::B64, a, b),
            };
            r.to_bits()
        }
        Ty::Pred => match op {
            AOp::And => a & b & 1,
            AOp::Or => (a | b) & 1,
            AOp::Xor => (a ^ b) & 1,
            _ => 0,
        },
        _ => int_arith(op, ty, a, b),
    }
}

fn int_arith(op: AOp, ty: Ty, a: u64, b: u64) -> u64 {
    let bits = ty.bits();
    let signed = ty.signed();
    let (ua, ub) = (a & ones(bits), b & ones(bits));
    let (sa, sb) = (sext(a, bits) as i64, sext(b, bits) as i64);
    let r = match op {
        AOp::Add => ua.wrapping_add(ub),
        AOp::Sub => ua.wrapping_sub(ub),
        AOp::MulLo => ua.wrapping_mul(ub),
        AOp::MulHi => {
            if signed {
                ((sa as i128 * sb as i128) >> bits) as u64
            } else {
                ((ua as u128 * ub as u128) >> bits) as u64
            }
        }
        AOp::MulWide => {
            // The result is twice as wide: return all of it.
            return if signed { (sa as i128 * sb as i128) as u64 } else { (ua as u128 * ub as u128) as u64 }
                & ones(2 * bits);
        }
        AOp::Div => {
            if ub == 0 {
                ones(bits)
            } else if signed {
                sa.wrapping_div(sb) as u64
            } else {
                ua / ub
            }
        }
        AOp::Rem => {
            if ub == 0 {
                ua
            } else if signed {
                sa.wrapping_rem(sb) as u64
            } else {
                ua % ub
            }
        }
        AOp::Min => {
            if signed {
                sa.min(sb) as u64
            } else {
                ua.min(ub)
            }
        }
        AOp::Max => {
            if signed {
                sa.max(sb) as u64
            } else {
                ua.max(ub)
            }
        }
        AOp::And => ua & ub,
        AOp::Or => ua | ub,
        AOp::Xor => ua ^ ub,
        AOp::Shl => {
            let s = (b & 0xffff_ffff).min(bits as u64) as u32;
            if s >= bits {
                0
            } else {
                ua << s
            }
        }
        AOp::Shr => {
            let s = (b & 0xffff_ffff).min(bits as u64) as u32;
            if signed {
                (sa >> s.min(63)) as u64
            } else if s >= bits {
                0
            } else {
                ua >> s
            }
        }
        AOp::CopySign => ua,
    };
    r & ones(bits)
}

fn unary(op: UOp, ty: Ty, ftz: bool, a: u64) -> u64 {
    match ty {
        Ty::F32 => {
            let x = f(a, ftz);
            let r = match op {
                UOp::Neg => -x,
                UOp::Abs => x.abs(),
                UOp::Sqrt => x.sqrt(),
                UOp::Rsqrt => 1.0 / x.sqrt(),
                UOp::Rcp => 1.0 / x,
                UOp::Ex2 => x.exp2(),
                UOp::Lg2 => x.log2(),
                UOp::Sin => x.sin(),
                UOp::Cos => x.cos(),
                UOp::Tanh => x.tanh(),
                _ => return mask(Ty::B32, int_unary(op, Ty::B32, a)),
            };
            flush(r, ftz).to_bits() as u64
        }
        Ty::F64 => {
            let x = f64::from_bits(a);
            let r = match op {
                UOp::Neg => -x,
                UOp::Abs => x.abs(),
                UOp::Sqrt => x.sqrt(),
                UOp::Rsqrt => 1.0 / x.sqrt(),
                UOp::Rcp => 1.0 / x,
                UOp::Ex2 => x.exp2(),
                UOp::Lg2 => x.log2(),
                UOp::Sin => x.sin(),
                UOp::Cos => x.cos(),
                UOp::Tanh => x.tanh(),
                _ => return int_unary(op, Ty::B64, a),
            };
            r.to_bits()
        }
        Ty::Pred => match op {
            UOp::Not => (!a) & 1,
            _ => a & 1,
        },
        _ => int_unary(op, ty, a),
    }
}

fn int_unary(op: UOp, ty: Ty, a: u64) -> u64 {
    let bits = ty.bits();
    let ua = a & ones(bits);
    let sa = sext(a, bits) as i64;
    let r = match op {
        UOp::Neg => sa.wrapping_neg() as u64,
        UOp::Abs => sa.wrapping_abs() as u64,
        UOp::Not => !ua,
        UOp::CNot => (ua == 0) as u64,
        UOp::Popc => ua.count_ones() as u64,
        UOp::Clz => (ua.leading_zeros() - (64 - bits)) as u64,
        UOp::Brev => ua.reverse_bits() >> (64 - bits),
        _ => ua,
    };
    r & ones(bits)
}

fn compare(cmp: Cmp, ty: Ty, ftz: bool, a: u64, b: u64) -> bool {
    if ty.float() {
        let (x, y) =
            if ty == Ty::F64 { (f64::from_bits(a), f64::from_bits(b)) } else { (f(a, ftz) as f64, f(b, ftz) as f64) };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt | Cmp::Lo => !nan && x < y,
            Cmp::Le | Cmp::Ls => !nan && x <= y,
            Cmp::Gt | Cmp::Hi => !nan && x > y,
            Cmp::Ge | Cmp::Hs => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
        };
    }
    let bits = ty.bits();
    let (ua, ub) = (a & ones(bits), b & ones(bits));
    let (sa, sb) = (sext(a, bits) as i64, sext(b, bits) as i64);
    let signed = ty.signed();
    match cmp {
        Cmp::Eq | Cmp::Equ => ua == ub,
        Cmp::Ne | Cmp::Neu => ua != ub,
        Cmp::Lt | Cmp::Ltu => {
            if signed {
                sa < sb
            } else {
                ua < ub
            }
        }
        Cmp::Le | Cmp::Leu => {
            if signed {
                sa <= sb
            } else {
                ua <= ub
            }
        }
        Cmp::Gt | Cmp::Gtu => {
            if signed {
                sa > sb
            } else {
                ua > ub
            }
        }
        Cmp::Ge | Cmp::Geu => {
            if signed {
                sa >= sb
            } else {
                ua >= ub
            }
        }
        Cmp::Lo => ua < ub,
        Cmp::Ls => ua <= ub,
        Cmp::Hi => ua > ub,
        Cmp::Hs => ua >= ub,
        Cmp::Num => true,
        Cmp::Nan => false,
    }
}

fn bf16_to_f32(v: u64) -> f32 {
    f32::from_bits(((v & 0xffff) as u32) << 16)
}

fn f32_to_bf16(x: f32, rnd: Rnd) -> u64 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    let r = match rnd {
        Rnd::Rz => b,
        _ => b.wrapping_add(0x7fff + ((b >> 16) & 1)),
    };
    (r >> 16) as u64
}

fn f16_to_f32(v: u64) -> f32 {
    let h = (v & 0xffff) as u32;
    let sign = (h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

fn f32_to_f16(x: f32) -> u64 {
    // Round to nearest even through f64 arithmetic on the scaled value.
    if x.is_nan() {
        return 0x7e00;
    }
    let sign = if x.is_sign_negative() { 0x8000u64 } else { 0 };
    let a = x.abs() as f64;
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 6.103_515_625e-5 {
        // Subnormal range: units of 2^-24.
        let m = (a * 16_777_216.0).round_ties_even() as u64;
        return sign | m;
    }
    let e = a.log2().floor() as i32;
    let e = if 2f64.powi(e) > a {
        e - 1
    } else if 2f64.powi(e + 1) <= a {
        e + 1
    } else {
        e
    };
    let m = (a / 2f64.powi(e) * 1024.0).round_ties_even() as u64; // 1024..=2048
    let (e, m) = if m == 2048 { (e + 1, 1024) } else { (e, m) };
    if e > 15 {
        return sign | 0x7c00;
    }
    sign | (((e + 15) as u64) << 10) | (m - 1024)
}

fn round_int(x: f64, rnd: Rnd) -> f64 {
    match rnd {
        Rnd::Rni | Rnd::Rn => x.round_ties_even(),
        Rnd::Rzi | Rnd::Rz => x.trunc(),
        Rnd::Rmi | Rnd::Rm => x.floor(),
        Rnd::Rpi | Rnd::Rp => x.ceil(),
        Rnd::None => x.trunc(),
    }
}

fn convert(dty: Ty, sty: Ty, rnd: Rnd, sat: bool, ftz: bool, a: u64) -> u64 {
    // Source as f64 (floats) or i128 (integers).
    let sf: Option<f64> = match sty {
        Ty::F32 => Some(f(a, ftz) as f64),
        Ty::F64 => Some(f64::from_bits(a)),
        Ty::Bf16 => Some(bf16_to_f32(a) as f64),
        Ty::F16 => Some(f16_to_f32(a) as f64),
        _ => None,
    };
    let si: i128 = if sty.signed() { sext(a, sty.bits()) as i64 as i128 } else { (a & ones(sty.bits())) as i128 };
    match dty {
        Ty::F32 => {
            let mut r = match sf {
                Some(x) if sty == Ty::F32 && matches!(rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi) => {
                    round_int(x, rnd) as f32
                }
                Some(x) if sty == Ty::F64 && matches!(rnd, Rnd::Rz | Rnd::Rm | Rnd::Rp) => round_f32(x, rnd),
                Some(x) => x as f32,
                None => si as f32,
            };
            if sat {
                r = saturate(r);
            }
            flush(r, ftz).to_bits() as u64
        }
        Ty::F64 => {
            let mut r = match sf {
                Some(x) if matches!(rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi) => round_int(x, rnd),
                Some(x) => x,
                None => si as f64,
            };
            if sat {
                r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
            }
            r.to_bits()
        }
        Ty::Bf16 => {
            let x = sf.map(|x| x as f32).unwrap_or(si as f32);
            f32_to_bf16(x, rnd)
        }
        Ty::F16 => {
            let x = sf.map(|x| x as f32).unwrap_or(si as f32);
            f32_to_f16(x)
        }
        Ty::Pred => (a != 0) as u64,
        _ => {
            let bits = dty.bits();
            let (lo, hi): (i128, i128) = if dty.signed() {
                (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
            } else {
                (0, (1i128 << bits) - 1)
            };
            let v: i128 = match sf {
                // Float → int saturates, NaN → 0 (as the hardware does).
                Some(x) => {
                    let r = round_int(x, rnd);
                    if r.is_nan() {
                        0
                    } else {
                        (r.clamp(lo as f64, hi as f64)) as i128
                    }
                }
                None if sat => si.clamp(lo, hi),
                None => si,
            };
            (v as u64) & ones(bits)
        }
    }
}

fn atomic_op(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    match (op, ty) {
        (AtomOp::Add, Ty::F32) => (f32::from_bits(old as u32) + f32::from_bits(b as u32)).to_bits() as u64,
        (AtomOp::Add, Ty::F64) => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
        (AtomOp::Min, Ty::F32) => f32::from_bits(old as u32).min(f32::from_bits(b as u32)).to_bits() as u64,
        (AtomOp::Max, Ty::F32) => f32::from_bits(old as u32).max(f32::from_bits(b as u32)).to_bits() as u64,
        (AtomOp::Add, _) => int_arith(AOp::Add, ty, old, b),
        (AtomOp::Min, _) => int_arith(AOp::Min, ty, old, b),
        (AtomOp::Max, _) => int_arith(AOp::Max, ty, old, b),
        (AtomOp::And, _) => old & b,
        (AtomOp::Or, _) => old | b,
        (AtomOp::Xor, _) => old ^ b,
        (AtomOp::Exch, _) => b,
        (AtomOp::Cas, _) => {
            if old == b & ones(ty.bits()) {
                c
            } else {
                old
            }
        }
        (AtomOp::Inc, _) => {
            if (old & 0xffff_ffff) >= (b & 0xffff_ffff) {
                0
            } else {
                old + 1
            }
        }
        (AtomOp::Dec, _) => {
            if old == 0 || (old & 0xffff_ffff) > (b & 0xffff_ffff) {
                b
            } else {
                old - 1
            }
        }
    }
}

/// Host threads parked in `wait_for_change`: the words they watch (address → how many).
static WATCHED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
static WOKEN: std::sync::Condvar = std::sync::Condvar::new();
/// How many are parked: an atomic finds 0 here without taking the lock.
static PARKED: AtomicUsize = AtomicUsize::new(0);

fn read_word(addr: u64, bytes: u64) -> u64 {
    // SAFETY: addr is a global word an atomic of this launch just accessed (checked then; the
    // allocation outlives the launch), aligned to `bytes`.
    unsafe {
        if bytes == 8 {
            (*(addr as *const AtomicU64)).load(Ordering::Acquire)
        } else {
            (*(addr as *const AtomicU32)).load(Ordering::Acquire) as u64
        }
    }
}

/// Parks the calling host thread until the global word at `addr` no longer holds `seen`
/// (a spin on a flag: the thread polls it again when it wakes). The timeout covers a word
/// changed by a plain store, which does not wake anyone.
fn wait_for_change(addr: u64, bytes: u64, seen: u64) {
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    PARKED.fetch_add(1, Ordering::SeqCst);
    if read_word(addr, bytes) != seen {
        PARKED.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    watched.push(addr);
    let (mut watched, _) =
        WOKEN.wait_timeout(watched, std::time::Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner());
    if let Some(i) = watched.iter().position(|&w| w == addr) {
        watched.swap_remove(i);
    }
    PARKED.fetch_sub(1, Ordering::SeqCst);
}

/// Wakes the threads parked on `addr` (an atomic just changed it).
fn wake(addr: u64) {
    std::sync::atomic::fence(Ordering::SeqCst);
    if PARKED.load(Ordering::SeqCst) == 0 {
        return;
    }
    let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    if watched.contains(&addr) {
        WOKEN.notify_all();
    }
}

/// A real atomic read-modify-write on host memory (blocks run on several host threads); a
/// change wakes the threads waiting on the word.
fn global_atomic(op: AtomOp, ty: Ty, addr: u64, b: u64, c: u64) -> u64 {
    let old = atomic_rmw(op, ty, addr, b, c);
    let mask = if ty.bytes() == 8 { u64::MAX } else { u32::MAX as u64 };
    if atomic_op(op, ty, old, b, c) & mask != old & mask {
        wake(addr);
    }
    old
}

fn atomic_rmw(op: AtomOp, ty: Ty, addr: u64, b: u64, c: u64) -> u64 {
    if ty.bytes() == 8 {
        // SAFETY: the caller checked that [addr, addr + 8) is inside a live allocation and aligned.
        let cell = unsafe { &*(addr as *const AtomicU64) };
        let mut old = cell.load(Ordering::Relaxed);
        loop {
            let new = atomic_op(op, ty, old, b, c);
            match cell.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return old,
                Err(x) => old = x,
            }
        }
    } else {
        // SAFETY: as above, 4 bytes.
        let cell = unsafe { &*(addr as *const AtomicU32) };
        let mut old = cell.load(Ordering::Relaxed);
        loop {
            let new = atomic_op(op, ty, old as u64, b, c) as u32;
            match cell.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return old as u64,
                Err(x) => old = x,
            }
        }
    }
}
