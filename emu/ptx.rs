//! PTX text → decoded kernels. Covers what nvcc emits for `kernels/*.cu` (and a margin): every
//! instruction is decoded once at module load into `Inst`, with registers as indices, so the
//! interpreter never looks at text. An instruction this decoder does not know is a load error
//! naming the kernel, the line and the opcode, never a silent skip.

use std::collections::HashMap;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ty {
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    Bf16,
    F32,
    F64,
    Pred,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "bf16" => Ty::Bf16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    pub fn bits(self) -> u32 {
        match self {
            Ty::B8 | Ty::U8 | Ty::S8 => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
            Ty::Pred => 1,
        }
    }
    pub fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }
    pub fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub fn float(self) -> bool {
        matches!(self, Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
    Clock,
    Clock64,
    SmId,
}

/// An operand that yields a value.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Src {
    Reg(u32),
    Imm(u64),
    Special(Special),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Space {
    Global,
    Shared,
    Param,
    /// Generic addressing: shared if inside the shared window, global otherwise.
    Generic,
}

/// `[base + offset]`; a symbol base is already resolved to its offset in its space.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Addr {
    pub base: Option<u32>,
    pub offset: i64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rnd {
    Rn,
    Rz,
    Rm,
    Rp,
    /// Integer rounding for float → int conversions.
    Rni,
    Rzi,
    Rmi,
    Rpi,
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    CopySign,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UOp {
    Neg,
    Abs,
    Not,
    CNot,
    Sqrt,
    Rsqrt,
    Rcp,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
    Popc,
    Clz,
    Brev,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
    Inc,
    Dec,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, PartialEq, Debug)]
pub enum Op {
    Mov {
        ty: Ty,
        d: u32,
        a: Src,
    },
    /// `mov.b64 %rd, {%r1, %r2}`: parts from low to high.
    Pack {
        part_bits: u32,
        d: u32,
        parts: Vec<Src>,
    },
    /// `mov.b64 {%r1, %r2}, %rd`.
    Unpack {
        part_bits: u32,
        ds: Vec<Option<u32>>,
        a: Src,
    },
    Arith {
        op: AOp,
        ty: Ty,
        ftz: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Unary {
        op: UOp,
        ty: Ty,
        ftz: bool,
        d: u32,
        a: Src,
    },
    /// `fma`/`mad` on floats with rounding `rnd`; `mad.lo/hi/wide` on integers.
    Fma {
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Mad {
        mode: AOp,
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        ftz: bool,
        d: u32,
        dn: Option<u32>,
        a: Src,
        b: Src,
        comb: Option<(BoolOp, Src, bool)>,
    },
    /// `bfe`: `len` bits of `a` from bit `pos` (sign-extended for signed types).
    Bfe {
        ty: Ty,
        d: u32,
        a: Src,
        pos: Src,
        len: Src,
    },
    /// `bfi`: `b` with bits `[pos, pos + len)` replaced by the low bits of `a`.
    Bfi {
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        pos: Src,
        len: Src,
    },
    /// `lop3.b32`: any bitwise function of three inputs, given by its truth table.
    Lop3 {
        d: u32,
        a: Src,
        b: Src,
        c: Src,
        lut: Src,
    },
    /// `shf.{l,r}.{wrap,clamp}.b32`: the funnel shift of the 64-bit `{b, a}`.
    Shf {
        left: bool,
        clamp: bool,
        d: u32,
        a: Src,
        b: Src,
        n: Src,
    },
    /// `prmt.b32` (default mode): bytes of `{b, a}` picked by the selector's nibbles.
    Prmt {
        d: u32,
        a: Src,
        b: Src,
        sel: Src,
    },
    /// `bfind`: the position of the most significant (non-sign) bit, all ones if none.
    Bfind {
        ty: Ty,
        shiftamt: bool,
        d: u32,
        a: Src,
    },
    /// `testp.{finite,infinite,number,notanumber,normal,subnormal}`.
    Testp {
        ty: Ty,
        what: u8,
        d: u32,
        a: Src,
    },
    Selp {
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        p: Src,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Rnd,
        sat: bool,
        ftz: bool,
        d: u32,
        a: Src,
    },
    /// Float arithmetic with an explicit rounding mode (add.rz.f32, mul.rm.f32, ...).
    ArithRnd {
        op: AOp,
        ty: Ty,
        rnd: Rnd,
        d: u32,
        a: Src,
        b: Src,
    },
    Ld {
        space: Space,
        ty: Ty,
        ds: Vec<Option<u32>>,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        addr: Addr,
        srcs: Vec<Src>,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: Ty,
        d: Option<u32>,
        addr: Addr,
        b: Src,
        c: Option<Src>,
    },
    /// `cvta.to.global`, `cvta.shared`...: address space conversion.
    Cvta {
        to_generic: bool,
        space: Space,
        d: u32,
        a: Src,
    },
    CpAsync {
        dst: Addr,
        src: Addr,
        bytes: u32,
        src_bytes: Option<Src>,
    },
    Bra {
        target: usize,
    },
    Bar,
    BarWarp {
        mask: Src,
    },
    Shfl {
        mode: ShflMode,
        d: u32,
        p: Option<u32>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: u32,
        a: Src,
        negate: bool,
        mask: Src,
    },
    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c`: a warp's 16×16 bf16
    /// A times 16×8 bf16 B plus f32 C, each lane holding the fragments the PTX ISA assigns it
    /// (exec.rs `mma_m16n8k16`).
    Mma {
        d: [u32; 4],
        a: [Src; 4],
        b: [Src; 2],
        c: [Src; 4],
    },
    Exit,
    /// `nanosleep`: a hint on the GPU; here the thread waits for its last global atomic's word
    /// to change (a spin-wait on a flag then costs no host CPU; see exec.rs `wait_for_change`).
    Sleep,
    Nop,
}

#[derive(Clone, Debug)]
pub struct Inst {
    pub guard: Option<(u32, bool)>,
    pub op: Op,
    /// The instruction as written, for messages.
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub bytes: u32,
    pub offset: u32,
}

#[derive(Clone, Debug)]
pub struct SharedVar {
    pub name: String,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    pub param_bytes: u32,
    pub code: Vec<Inst>,
    pub nregs: u32,
    /// Static shared variables at their offsets; dynamic shared memory starts at `dynamic_offset`.
    pub shared_vars: Vec<SharedVar>,
    pub static_shared: u64,
    pub dynamic_offset: u64,
    pub maxntid: Option<(u32, u32, u32)>,
    pub reqntid: Option<(u32, u32, u32)>,
}

pub struct Module {
    pub kernels: HashMap<String, std::sync::Arc<Kernel>>,
}

/// The shared window for generic addressing (far above any host address).
pub const SHARED_WINDOW: u64 = 0x7f00_0000_0000_0000;

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            out.push(c as char);
            if c == b'"' {
                in_str = false;
            }
            i += 1;
        } else if c == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if c == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

/// Scope braces (`{` opening a line, `}` closing one) carry no meaning for us: registers are
/// per kernel. Vector operands keep theirs (they follow an opcode, never start a line).
fn strip_scope_braces(line: &str) -> String {
    let mut s = line.trim();
    loop {
        let mut changed = false;
        if let Some(rest) = s.strip_prefix('{') {
            if !rest.trim_start().starts_with('%') {
                s = rest.trim();
                changed = true;
            }
        }
        if let Some(rest) = s.strip_suffix('}') {
            let r = rest.trim_end();
            if r.is_empty() || r.ends_with(';') {
                s = r;
                changed = true;
            }
        }
        if !changed {
            return s.to_string();
        }
    }
}

pub fn parse_module(text: &str) -> Result<Module, String> {
    // `.version`, `.target`, `.address_size`, `.loc` and `.file` end at the line, not at a `;`.
    let text: String = strip_comments(text)
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            ![".version", ".target", ".address_size", ".loc", ".file"].iter().any(|d| t.starts_with(d))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut kernels = HashMap::new();
    let mut module_shared: Vec<(String, u64, u64)> = Vec::new(); // name, align, bytes (0 = extern)
    let mut rest: &str = &text;
    loop {
        let t = rest.trim_start();
        if t.is_empty() {
            break;
        }
        // Module-level statements up to the next entry.
        if let Some(pos) = find_entry(t) {
            let (head, tail) = t.split_at(pos);
            for stmt in head.split(';') {
                module_statement(stmt.trim(), &mut module_shared)?;
            }
            let open = tail.find('{').ok_or("PTX: an .entry without a body")?;
            let close = matching_brace(tail, open).ok_or("PTX: an .entry body is not closed")?;
            let k = parse_kernel(&tail[..open], &tail[open + 1..close], &module_shared)?;
            kernels.insert(k.name.clone(), std::sync::Arc::new(k));
            rest = &tail[close + 1..];
        } else {
            for stmt in t.split(';') {
                module_statement(stmt.trim(), &mut module_shared)?;
            }
            break;
        }
    }
    if kernels.is_empty() {
        return Err("PTX: no .entry in the module".into());
    }
    Ok(Module { kernels })
}

fn find_entry(t: &str) -> Option<usize> {
    let at = t.find(".entry")?;
    // The statement starts after the previous `;` or `}` (at `.visible`/`.weak`, if any).
    let start = t[..at].rfind([';', '}']).map(|i| i + 1).unwrap_or(0);
    Some(start + (t[start..at].len() - t[start..at].trim_start().len()))
}

fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn module_statement(stmt: &str, shared: &mut Vec<(String, u64, u64)>) -> Result<(), String> {
    let s = stmt.trim();
    if s.is_empty() {
        return Ok(());
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    match words[0] {
        ".version" | ".target" | ".address_size" | ".file" | ".loc" | ".section" => Ok(()),
        ".extern" | ".shared" | ".visible" | ".global" | ".const" | ".weak" => {
            if words.contains(&".shared") {
                let (name, align, bytes) = parse_var_decl(&words)?;
                shared.push((name, align, if words[0] == ".extern" { 0 } else { bytes }));
                Ok(())
            } else if words.contains(&".func") {
                Err(format!("PTX: device functions (.func) are not emulated: `{s}`"))
            } else {
                Err(format!("PTX: module-level `{s}` is not emulated (only .shared variables are)"))
            }
        }
        _ => Err(format!("PTX: unknown module-level statement `{s}`")),
    }
}

/// `.shared .align 16 .b8 name[128]` → (name, align, bytes); `name[]` → bytes 0.
fn parse_var_decl(words: &[&str]) -> Result<(String, u64, u64), String> {
    let mut align = 1u64;
    let mut elem = 1u64;
    let mut i = 0;
    let mut decl = None;
    while i < words.len() {
        let w = words[i];
        if w == ".align" {
            align = words.get(i + 1).and_then(|a| a.parse().ok()).ok_or("PTX: bad .align")?;
            i += 2;
            continue;
        }
        if let Some(t) = w.strip_prefix('.').and_then(Ty::parse) {
            elem = t.bytes() as u64;
        } else if !w.starts_with('.') {
            decl = Some(w);
        }
        i += 1;
    }
    let decl = decl.ok_or_else(|| format!("PTX: no variable name in `{}`", words.join(" ")))?;
    if let Some(open) = decl.find('[') {
        let name = decl[..open].to_string();
        let inner = decl[open + 1..].trim_end_matches(']');
        let n: u64 =
            if inner.is_empty() { 0 } else { inner.parse().map_err(|_| format!("PTX: bad array size in {decl}"))? };
        Ok((name, align, n * elem))
    } else {
        Ok((decl.to_string(), align, elem))
    }
}

struct Regs {
    map: HashMap<String, u32>,
    names: Vec<String>,
}

impl Regs {
    fn declare(&mut self, name: &str) {
        if !self.map.contains_key(name) {
            self.map.insert(name.to_string(), self.names.len() as u32);
            self.names.push(name.to_string());
        }
    }
}

fn parse_kernel(header: &str, body: &str, module_shared: &[(String, u64, u64)]) -> Result<Kernel, String> {
    // header: `.visible .entry NAME( params ) .maxntid ...`
    let after = &header[header.find(".entry").ok_or("PTX: no .entry")? + 6..];
    let (name, rest) = match after.find('(') {
        Some(p) => (after[..p].trim().to_string(), &after[p..]),
        None => (after.split_whitespace().next().unwrap_or("").to_string(), ""),
    };
    let mut params = Vec::new();
    let mut param_bytes = 0u32;
    let mut perf = rest;
    if let Some(close) = rest.find(')') {
        for p in rest[1..close].split(',') {
            let words: Vec<&str> = p.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            let (pname, align, bytes) = parse_var_decl(&words)?;
            let align = align.max(if bytes >= 8 { 8 } else { bytes.max(1) }) as u32;
            let offset = param_bytes.div_ceil(align) * align;
            params.push(Param { name: pname, bytes: bytes as u32, offset });
            param_bytes = offset + bytes as u32;
        }
        perf = &rest[close + 1..];
    }
    let dims = |key: &str| -> Option<(u32, u32, u32)> {
        let p = perf.find(key)?;
        let nums: Vec<u32> =
            perf[p + key.len()..].split(['.', '{']).next()?.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        Some((nums.first().copied()?, nums.get(1).copied().unwrap_or(1), nums.get(2).copied().unwrap_or(1)))
    };
    let maxntid = dims(".maxntid");
    let reqntid = dims(".reqntid");

    let mut regs = Regs { map: HashMap::new(), names: Vec::new() };
    let mut shared: Vec<(String, u64, u64)> = module_shared.to_vec();
    let mut labels: HashMap<String, usize> = HashMap::new();
    let mut raw: Vec<(u32, String)> = Vec::new(); // (line, instruction text)

    // Lines → statements; labels map to the index of the next instruction.
    let mut text = String::new();
    let mut line_of_char: Vec<(usize, u32)> = Vec::new();
    for (n, line) in body.lines().enumerate() {
        line_of_char.push((text.len(), n as u32 + 1));
        text.push_str(&strip_scope_braces(line));
        text.push('\n');
    }
    let line_at = |pos: usize| -> u32 {
        match line_of_char.binary_search_by(|(s, _)| s.cmp(&pos)) {
            Ok(i) => line_of_char[i].1,
            Err(i) => line_of_char[i.saturating_sub(1)].1,
        }
    };
    let mut pos = 0usize;
    for stmt in text.split(';') {
        let start = pos;
        pos += stmt.len() + 1;
        let mut s = stmt.trim();
        // Labels: `NAME:` before an instruction.
        while let Some(colon) = s.find(':') {
            let cand = &s[..colon];
            if !cand.is_empty() && cand.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                labels.insert(cand.to_string(), raw.len());
                s = s[colon + 1..].trim();
            } else {
                break;
            }
        }
        if s.is_empty() {
            continue;
        }
        let lead = stmt.len() - stmt.trim_start().len();
        let line = line_at(start + lead);
        if s.starts_with(".reg") {
            let words: Vec<&str> = s.split_whitespace().collect();
            for decl in words[1..].iter().filter(|w| !w.starts_with('.')).flat_map(|w| w.split(',')) {
                let decl = decl.trim();
                if decl.is_empty() {
                    continue;
                }
                if let (Some(lt), Some(gt)) = (decl.find('<'), decl.find('>')) {
                    let base = &decl[..lt];
                    let n: u32 =
                        decl[lt + 1..gt].parse().map_err(|_| format!("PTX {name}: bad register list {decl}"))?;
                    for i in 0..n {
                        regs.declare(&format!("{base}{i}"));
                    }
                } else {
                    regs.declare(decl);
                }
            }
        } else if s.starts_with(".shared") {
            let words: Vec<&str> = s.split_whitespace().collect();
            let (n, align, bytes) = parse_var_decl(&words)?;
            shared.push((n, align, bytes));
        } else if s.starts_with(".local") {
            return Err(format!("PTX {name} line {line}: local memory (.local) is not emulated"));
        } else if s.starts_with(".pragma") || s.starts_with(".loc") {
        } else if s.starts_with('.') {
            return Err(format!("PTX {name} line {line}: unknown directive `{s}`"));
        } else {
            raw.push((line, s.to_string()));
        }
    }

    // Shared layout: static variables in order (aligned), then the dynamic area (align 16).
    let mut shared_vars = Vec::new();
    let mut off = 0u64;
    let mut extern_names = Vec::new();
    for (n, align, bytes) in &shared {
        if *bytes == 0 {
            extern_names.push(n.clone());
            continue;
        }
        off = off.div_ceil((*align).max(1)) * (*align).max(1);
        shared_vars.push(SharedVar { name: n.clone(), offset: off, bytes: *bytes });
        off += bytes;
    }
    let static_shared = off;
    let dynamic_offset = off.div_ceil(16) * 16;
    let mut symbols: HashMap<String, u64> = shared_vars.iter().map(|v| (v.name.clone(), v.offset)).collect();
    for n in extern_names {
        symbols.insert(n, dynamic_offset);
    }
    let param_offsets: HashMap<String, u32> = params.iter().map(|p| (p.name.clone(), p.offset)).collect();

    let ctx = Ctx { kernel: &name, regs: &mut regs, labels: &labels, symbols: &symbols, params: &param_offsets };
    let mut code = Vec::with_capacity(raw.len() + 1);
    let mut ctx = ctx;
    for (line, s) in &raw {
        let inst = decode(&mut ctx, s).map_err(|e| format!("PTX {name} line {line}: {e} in `{s}`"))?;
        code.push(Inst { guard: inst.0, op: inst.1, text: s.clone() });
    }
    // Falling off the end exits.
    code.push(Inst { guard: None, op: Op::Exit, text: "(end of kernel)".into() });
    Ok(Kernel {
        name,
        params,
        param_bytes,
        code,
        nregs: regs.names.len() as u32,
        shared_vars,
        static_shared,
        dynamic_offset,
        maxntid,
        reqntid,
    })
}

struct Ctx<'a> {
    kernel: &'a str,
    regs: &'a mut Regs,
    labels: &'a HashMap<String, usize>,
    symbols: &'a HashMap<String, u64>,
    params: &'a HashMap<String, u32>,
}

impl Ctx<'_> {
    fn reg(&mut self, s: &str) -> Result<u32, String> {
        let s = s.trim();
        self.regs.map.get(s).copied().ok_or_else(|| format!("undeclared register {s}"))
    }
    fn dst(&mut self, s: &str) -> Result<u32, String> {
        self.reg(s)
    }
    fn src(&mut self, s: &str, ty: Ty) -> Result<Src, String> {
        let s = s.trim();
        if s.starts_with('%') {
            if let Some(sp) = special(s) {
                return Ok(Src::Special(sp));
            }
            return self.reg(s).map(Src::Reg);
        }
        if let Some(&off) = self.symbols.get(s) {
            return Ok(Src::Imm(off));
        }
        imm(s, ty).map(Src::Imm)
    }
    fn addr(&mut self, s: &str) -> Result<Addr, String> {
        let inner = s.trim().strip_prefix('[').and_then(|x| x.strip_suffix(']')).ok_or("expected [address]")?;
        let inner = inner.trim();
        let (base, off) = match inner.find('+') {
            Some(p) => (inner[..p].trim(), inner[p + 1..].trim()),
            None => (inner, "0"),
        };
        let offset: i64 = parse_int(off).ok_or_else(|| format!("bad address offset {off}"))? as i64;
        if base.starts_with('%') {
            return Ok(Addr { base: Some(self.reg(base)?), offset });
        }
        if let Some(&o) = self.symbols.get(base) {
            return Ok(Addr { base: None, offset: o as i64 + offset });
        }
        if let Some(&o) = self.params.get(base) {
            return Ok(Addr { base: None, offset: o as i64 + offset });
        }
        if let Some(v) = parse_int(base) {
            return Ok(Addr { base: None, offset: v as i64 + offset });
        }
        Err(format!("unknown symbol {base} (kernel {})", self.kernel))
    }
}

fn special(s: &str) -> Option<Special> {
    let dim = |x: &str| match x {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    let (head, tail) = match s.find('.') {
        Some(p) => (&s[..p], Some(&s[p + 1..])),
        None => (s, None),
    };
    Some(match (head, tail) {
        ("%tid", Some(d)) => Special::Tid(dim(d)?),
        ("%ntid", Some(d)) => Special::Ntid(dim(d)?),
        ("%ctaid", Some(d)) => Special::Ctaid(dim(d)?),
        ("%nctaid", Some(d)) => Special::Nctaid(dim(d)?),
        ("%laneid", None) => Special::LaneId,
        ("%warpid", None) => Special::WarpId,
        ("%nwarpid", None) => Special::NWarpId,
        ("%lanemask_eq", None) => Special::LaneMaskEq,
        ("%lanemask_lt", None) => Special::LaneMaskLt,
        ("%lanemask_le", None) => Special::LaneMaskLe,
        ("%lanemask_gt", None) => Special::LaneMaskGt,
        ("%lanemask_ge", None) => Special::LaneMaskGe,
        ("%clock", None) => Special::Clock,
        ("%clock64", None) => Special::Clock64,
        ("%smid", None) => Special::SmId,
        _ => return None,
    })
}

fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let t = t.strip_suffix('U').unwrap_or(t);
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') && t.chars().all(|c| c.is_ascii_digit()) {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

/// An immediate as the bits of `ty`: `0fXXXXXXXX` (f32 bits), `0dX..` (f64 bits), integers
/// (negative ones two's complement), decimal floats for float types.
fn imm(s: &str, ty: Ty) -> Result<u64, String> {
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        let bits = u32::from_str_radix(h, 16).map_err(|_| format!("bad float immediate {s}"))?;
        return Ok(if ty == Ty::F64 { (f32::from_bits(bits) as f64).to_bits() } else { bits as u64 });
    }
    if let Some(h) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
        let bits = u64::from_str_radix(h, 16).map_err(|_| format!("bad double immediate {s}"))?;
        return Ok(if ty == Ty::F64 { bits } else { (f64::from_bits(bits) as f32).to_bits() as u64 });
    }
    if let Some(v) = parse_int(s) {
        if ty.float() {
            let f = v as i64 as f64;
            return Ok(if ty == Ty::F64 { f.to_bits() } else { (f as f32).to_bits() as u64 });
        }
        return Ok(v);
    }
    if let Ok(f) = s.parse::<f64>() {
        return Ok(if ty == Ty::F64 { f.to_bits() } else { (f as f32).to_bits() as u64 });
    }
    Err(format!("bad operand {s}"))
}

/// Splits operands at top-level commas (not inside `{}` or `[]`).
fn operands(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '{' | '[' => {
                depth += 1;
                cur.push(c)
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn vector(s: &str) -> Option<Vec<String>> {
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    Some(inner.split(',').map(|x| x.trim().to_string()).collect())
}

fn rnd_of(mods: &[&str]) -> Rnd {
    for m in mods {
        match *m {
            "rn" => return Rnd::Rn,
            "rz" => return Rnd::Rz,
            "rm" => return Rnd::Rm,
            "rp" => return Rnd::Rp,
            "rni" => return Rnd::Rni,
            "rzi" => return Rnd::Rzi,
            "rmi" => return Rnd::Rmi,
            "rpi" => return Rnd::Rpi,
            _ => {}
        }
    }
    Rnd::None
}

fn space_of(mods: &[&str]) -> Space {
    if mods.contains(&"global") {
        Space::Global
    } else if mods.contains(&"shared") || mods.iter().any(|m| m.starts_with("shared::")) {
        Space::Shared
    } else if mods.contains(&"param") {
        Space::Param
    } else {
        Space::Generic
    }
}

fn last_ty(mods: &[&str]) -> Result<Ty, String> {
    mods.iter().rev().find_map(|m| Ty::parse(m)).ok_or_else(|| "no type suffix".to_string())
}

fn cmp_of(s: &str) -> Option<Cmp> {
    Some(match s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

type Decoded = (Option<(u32, bool)>, Op);

fn decode(ctx: &mut Ctx, s: &str) -> Result<Decoded, String> {
    let mut s = s.trim();
    let mut guard = None;
    if let Some(g) = s.strip_prefix('@') {
        let end = g.find(char::is_whitespace).ok_or("guard without instruction")?;
        let (neg, r) = match g[..end].strip_prefix('!') {
            Some(r) => (true, r),
            None => (false, &g[..end]),
        };
        guard = Some((ctx.reg(r)?, neg));
        s = g[end..].trim();
    }
    let (opcode, rest) = match s.find(char::is_whitespace) {
        Some(p) => (&s[..p], s[p..].trim()),
        None => (s, ""),
    };
    let parts: Vec<&str> = opcode.split('.').collect();
    let base = parts[0];
    let mods = &parts[1..];
    let ops = operands(rest);
    let ftz = mods.contains(&"ftz");
    let sat = mods.contains(&"sat");
    let want = |n: usize| -> Result<(), String> {
        if ops.len() < n {
            Err(format!("expected {n} operands"))
        } else {
            Ok(())
        }
    };
    let op = match base {
        "mov" => {
            want(2)?;
            let ty = last_ty(mods)?;
            if let Some(parts) = vector(&ops[1]) {
                let part_bits = ty.bits() / parts.len() as u32;
                let pty = match part_bits {
                    16 => Ty::B16,
                    32 => Ty::B32,
                    _ => Ty::B8,
                };
                let parts = parts.iter().map(|p| ctx.src(p, pty)).collect::<Result<Vec<_>, _>>()?;
                Op::Pack { part_bits, d: ctx.dst(&ops[0])?, parts }
            } else if let Some(ds) = vector(&ops[0]) {
                let part_bits = ty.bits() / ds.len() as u32;
                let ds = ds
                    .iter()
                    .map(|d| if d == "_" { Ok(None) } else { ctx.dst(d).map(Some) })
                    .collect::<Result<Vec<_>, _>>()?;
                Op::Unpack { part_bits, ds, a: ctx.src(&ops[1], ty)? }
            } else {
                Op::Mov { ty, d: ctx.dst(&ops[0])?, a: ctx.src(&ops[1], ty)? }
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" | "copysign" => {
            want(3)?;
            let ty = last_ty(mods)?;
            let aop = match base {
                "add" => AOp::Add,
                "sub" => AOp::Sub,
                "mul" if mods.contains(&"hi") => AOp::MulHi,
                "mul" if mods.contains(&"wide") => AOp::MulWide,
                "mul" => AOp::MulLo,
                "div" => AOp::Div,
                "rem" => AOp::Rem,
                "min" => AOp::Min,
                "max" => AOp::Max,
                "and" => AOp::And,
                "or" => AOp::Or,
                "xor" => AOp::Xor,
                "shl" => AOp::Shl,
                "shr" => AOp::Shr,
                _ => AOp::CopySign,
            };
            // Shift amounts are always u32.
            let bty = if matches!(aop, AOp::Shl | AOp::Shr) { Ty::U32 } else { ty };
            let (d, a, b) = (ctx.dst(&ops[0])?, ctx.src(&ops[1], ty)?, ctx.src(&ops[2], bty)?);
            let rnd = rnd_of(mods);
            if ty.float()
                && matches!(rnd, Rnd::Rz | Rnd::Rm | Rnd::Rp)
                && matches!(aop, AOp::Add | AOp::Sub | AOp::MulLo)
            {
                Op::ArithRnd { op: aop, ty, rnd, d, a, b }
            } else {
                Op::Arith { op: aop, ty, ftz, d, a, b }
            }
        }
        "neg" | "abs" | "not" | "cnot" | "sqrt" | "rsqrt" | "rcp" | "ex2" | "lg2" | "sin" | "cos" | "tanh" | "popc"
        | "clz" | "brev" => {
            want(2)?;
            let ty = last_ty(mods)?;
            let uop = match base {
                "neg" => UOp::Neg,
                "abs" => UOp::Abs,
                "not" => UOp::Not,
                "cnot" => UOp::CNot,
                "sqrt" => UOp::Sqrt,
                "rsqrt" => UOp::Rsqrt,
                "rcp" => UOp::Rcp,
                "ex2" => UOp::Ex2,
                "lg2" => UOp::Lg2,
                "sin" => UOp::Sin,
                "cos" => UOp::Cos,
                "tanh" => UOp::Tanh,
                "popc" => UOp::Popc,
                "clz" => UOp::Clz,
                _ => UOp::Brev,
            };
            Op::Unary { op: uop, ty, ftz, d: ctx.dst(&ops[0])?, a: ctx.src(&ops[1], ty)? }
        }
        "fma" | "mad" => {
            want(4)?;
            let ty = last_ty(mods)?;
            let d = ctx.dst(&ops[0])?;
            if ty.float() {
                let (a, b, c) = (ctx.src(&ops[1], ty)?, ctx.src(&ops[2], ty)?, ctx.src(&ops[3], ty)?);
                let rnd = match rnd_of(mods) {
                    Rnd::None => Rnd::Rn,
                    r => r,
                };
                Op::Fma { ty, rnd, ftz, sat, d, a, b, c }
            } else {
                let mode = if mods.contains(&"hi") {
                    AOp::MulHi
                } else if mods.contains(&"wide") {
                    AOp::MulWide
                } else {
                    AOp::MulLo
                };
                let cty = if mode == AOp::MulWide { wide(ty) } else { ty };
                Op::Mad { mode, ty, d, a: ctx.src(&ops[1], ty)?, b: ctx.src(&ops[2], ty)?, c: ctx.src(&ops[3], cty)? }
            }
        }
        "setp" => {
            want(3)?;
            let ty = last_ty(mods)?;
            let cmp = mods.first().and_then(|m| cmp_of(m)).ok_or("setp without comparison")?;
            let (d, dn) = match ops[0].find('|') {
                Some(p) => (ctx.dst(&ops[0][..p])?, Some(ctx.dst(&ops[0][p + 1..])?)),
                None => (ctx.dst(&ops[0])?, None),
            };
            let comb = if ops.len() > 3 {
                let bop = if mods.contains(&"and") {
                    BoolOp::And
                } else if mods.contains(&"or") {
                    BoolOp::Or
                } else {
                    BoolOp::Xor
                };
                let (neg, p) = match ops[3].strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, ops[3].as_str()),
                };
                Some((bop, ctx.src(p, Ty::Pred)?, neg))
            } else {
                None
            };
            Op::Setp { cmp, ty, ftz, d, dn, a: ctx.src(&ops[1], ty)?, b: ctx.src(&ops[2], ty)?, comb }
        }
        "selp" => {
            want(4)?;
            let ty = last_ty(mods)?;
            Op::Selp {
                ty,
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], ty)?,
                b: ctx.src(&ops[2], ty)?,
                p: ctx.src(&ops[3], Ty::Pred)?,
            }
        }
        "lop3" => {
            want(5)?;
            Op::Lop3 {
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], Ty::B32)?,
                b: ctx.src(&ops[2], Ty::B32)?,
                c: ctx.src(&ops[3], Ty::B32)?,
                lut: ctx.src(&ops[4], Ty::B32)?,
            }
        }
        "shf" => {
            want(4)?;
            Op::Shf {
                left: mods.contains(&"l"),
                clamp: mods.contains(&"clamp"),
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], Ty::B32)?,
                b: ctx.src(&ops[2], Ty::B32)?,
                n: ctx.src(&ops[3], Ty::U32)?,
            }
        }
        "prmt" => {
            want(4)?;
            if mods.iter().any(|m| ["f4e", "b4e", "rc8", "ecl", "ecr", "rc16"].contains(m)) {
                return Err("prmt with a mode is not emulated".into());
            }
            Op::Prmt {
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], Ty::B32)?,
                b: ctx.src(&ops[2], Ty::B32)?,
                sel: ctx.src(&ops[3], Ty::B32)?,
            }
        }
        "bfind" => {
            want(2)?;
            let ty = last_ty(mods)?;
            Op::Bfind { ty, shiftamt: mods.contains(&"shiftamt"), d: ctx.dst(&ops[0])?, a: ctx.src(&ops[1], ty)? }
        }
        "testp" => {
            want(2)?;
            let ty = last_ty(mods)?;
            let what = match mods.first().copied() {
                Some("finite") => 0,
                Some("infinite") => 1,
                Some("number") => 2,
                Some("notanumber") => 3,
                Some("normal") => 4,
                Some("subnormal") => 5,
                _ => return Err("testp without a property".into()),
            };
            Op::Testp { ty, what, d: ctx.dst(&ops[0])?, a: ctx.src(&ops[1], ty)? }
        }
        "bfe" => {
            want(4)?;
            let ty = last_ty(mods)?;
            Op::Bfe {
                ty,
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], ty)?,
                pos: ctx.src(&ops[2], Ty::U32)?,
                len: ctx.src(&ops[3], Ty::U32)?,
            }
        }
        "bfi" => {
            want(5)?;
            let ty = last_ty(mods)?;
            Op::Bfi {
                ty,
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], ty)?,
                b: ctx.src(&ops[2], ty)?,
                pos: ctx.src(&ops[3], Ty::U32)?,
                len: ctx.src(&ops[4], Ty::U32)?,
            }
        }
        "cvt" => {
            want(2)?;
            let tys: Vec<Ty> = mods.iter().filter_map(|m| Ty::parse(m)).collect();
            if tys.len() != 2 {
                return Err("cvt needs two types".into());
            }
            Op::Cvt {
                dty: tys[0],
                sty: tys[1],
                rnd: rnd_of(mods),
                sat,
                ftz,
                d: ctx.dst(&ops[0])?,
                a: ctx.src(&ops[1], tys[1])?,
            }
        }
        "cvta" => {
            want(2)?;
            let to = mods.contains(&"to");
            let space = space_of(mods);
            Op::Cvta { to_generic: !to, space, d: ctx.dst(&ops[0])?, a: ctx.src(&ops[1], Ty::U64)? }
        }
        "ld" | "ldu" => {
            want(2)?;
            let ty = last_ty(mods)?;
            let ds = match vector(&ops[0]) {
                Some(v) => v
                    .iter()
                    .map(|d| if d == "_" { Ok(None) } else { ctx.dst(d).map(Some) })
                    .collect::<Result<Vec<_>, _>>()?,
                None => vec![Some(ctx.dst(&ops[0])?)],
            };
            Op::Ld { space: space_of(mods), ty, ds, addr: ctx.addr(&ops[1])? }
        }
        "st" => {
            want(2)?;
            let ty = last_ty(mods)?;
            let srcs = match vector(&ops[1]) {
                Some(v) => v.iter().map(|x| ctx.src(x, ty)).collect::<Result<Vec<_>, _>>()?,
                None => vec![ctx.src(&ops[1], ty)?],
            };
            Op::St { space: space_of(mods), ty, addr: ctx.addr(&ops[0])?, srcs }
        }
        "atom" | "red" => {
            let ty = last_ty(mods)?;
            let aop = mods
                .iter()
                .find_map(|m| {
                    Some(match *m {
                        "add" => AtomOp::Add,
                        "min" => AtomOp::Min,
                        "max" => AtomOp::Max,
                        "exch" => AtomOp::Exch,
                        "cas" => AtomOp::Cas,
                        "and" => AtomOp::And,
                        "or" => AtomOp::Or,
                        "xor" => AtomOp::Xor,
                        "inc" => AtomOp::Inc,
                        "dec" => AtomOp::Dec,
                        _ => return None,
                    })
                })
                .ok_or("atom without operation")?;
            let space = space_of(mods);
            if base == "atom" {
                want(3)?;
                let c = if aop == AtomOp::Cas {
                    Some(ctx.src(ops.get(3).ok_or("cas needs 4 operands")?, ty)?)
                } else {
                    None
                };
                Op::Atom {
                    space,
                    op: aop,
                    ty,
                    d: Some(ctx.dst(&ops[0])?),
                    addr: ctx.addr(&ops[1])?,
                    b: ctx.src(&ops[2], ty)?,
                    c,
                }
            } else {
                want(2)?;
                Op::Atom { space, op: aop, ty, d: None, addr: ctx.addr(&ops[0])?, b: ctx.src(&ops[1], ty)?, c: None }
            }
        }
        "cp" => {
            if mods.first() == Some(&"async") && mods.contains(&"wait_all")
                || mods.contains(&"wait_group")
                || mods.contains(&"commit_group")
            {
                Op::Nop
            } else if mods.first() == Some(&"async") {
                want(3)?;
                let bytes = parse_int(&ops[2]).ok_or("cp.async size")? as u32;
                let src_bytes = match ops.get(3) {
                    Some(x) => Some(ctx.src(x, Ty::U32)?),
                    None => None,
                };
                Op::CpAsync { dst: ctx.addr(&ops[0])?, src: ctx.addr(&ops[1])?, bytes, src_bytes }
            } else {
                return Err(format!("`{opcode}` is not emulated"));
            }
        }
        "bra" | "brx" => {
            want(1)?;
            let t = ops[0].trim();
            Op::Bra { target: *ctx.labels.get(t).ok_or_else(|| format!("unknown label {t}"))? }
        }
        "bar" | "barrier" => {
            if mods.first() == Some(&"warp") {
                want(1)?;
                Op::BarWarp { mask: ctx.src(&ops[0], Ty::B32)? }
            } else if mods.contains(&"sync") || mods.is_empty() || mods.contains(&"aligned") {
                if ops.len() > 1 {
                    return Err("bar.sync with a thread count is not emulated".into());
                }
                Op::Bar
            } else {
                return Err(format!("`{opcode}` is not emulated"));
            }
        }
        "shfl" => {
            want(5)?;
            let mode = match mods.get(1).copied() {
                Some("up") => ShflMode::Up,
                Some("down") => ShflMode::Down,
                Some("bfly") => ShflMode::Bfly,
                Some("idx") => ShflMode::Idx,
                _ => return Err("shfl without .sync.mode".into()),
            };
            let (d, p) = match ops[0].find('|') {
                Some(x) => (ctx.dst(&ops[0][..x])?, Some(ctx.dst(&ops[0][x + 1..])?)),
                None => (ctx.dst(&ops[0])?, None),
            };
            Op::Shfl {
                mode,
                d,
                p,
                a: ctx.src(&ops[1], Ty::B32)?,
                b: ctx.src(&ops[2], Ty::B32)?,
                c: ctx.src(&ops[3], Ty::B32)?,
                mask: ctx.src(&ops[4], Ty::B32)?,
            }
        }
        "vote" => {
            want(3)?;
            let mode = match mods.get(1).copied() {
                Some("all") => VoteMode::All,
                Some("any") => VoteMode::Any,
                Some("uni") => VoteMode::Uni,
                Some("ballot") => VoteMode::Ballot,
                _ => return Err("vote without .sync.mode".into()),
            };
            let (negate, a) = match ops[1].strip_prefix('!') {
                Some(a) => (true, a.to_string()),
                None => (false, ops[1].clone()),
            };
            Op::Vote { mode, d: ctx.dst(&ops[0])?, a: ctx.src(&a, Ty::Pred)?, negate, mask: ctx.src(&ops[2], Ty::B32)? }
        }
        "mma" => {
            want(4)?;
            if mods != ["sync", "aligned", "m16n8k16", "row", "col", "f32", "bf16", "bf16", "f32"] {
                return Err(format!("`{opcode}` is not emulated (only mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32)"));
            }
            let regs = |s: &str, n: usize| match vector(s) {
                Some(v) if v.len() == n => Ok(v),
                _ => Err(format!("mma operand {s}: a vector of {n} registers expected")),
            };
            let (d, a, b, c) = (regs(&ops[0], 4)?, regs(&ops[1], 4)?, regs(&ops[2], 2)?, regs(&ops[3], 4)?);
            Op::Mma {
                d: [ctx.dst(&d[0])?, ctx.dst(&d[1])?, ctx.dst(&d[2])?, ctx.dst(&d[3])?],
                a: [ctx.src(&a[0], Ty::B32)?, ctx.src(&a[1], Ty::B32)?, ctx.src(&a[2], Ty::B32)?, ctx.src(&a[3], Ty::B32)?],
                b: [ctx.src(&b[0], Ty::B32)?, ctx.src(&b[1], Ty::B32)?],
                c: [ctx.src(&c[0], Ty::F32)?, ctx.src(&c[1], Ty::F32)?, ctx.src(&c[2], Ty::F32)?, ctx.src(&c[3], Ty::F32)?],
            }
        }
        "ret" | "exit" => Op::Exit,
        "nanosleep" => Op::Sleep,
        "membar" | "fence" | "prefetch" | "prefetchu" | "pmevent" => Op::Nop,
        _ => return Err(format!("`{opcode}` is not emulated")),
    };
    Ok((guard, op))
}

/// The type of a `.wide` result: twice the width.
pub fn wide(ty: Ty) -> Ty {
    match ty {
        Ty::S16 => Ty::S32,
        Ty::U16 => Ty::U32,
        Ty::S32 => Ty::S64,
        Ty::U32 => Ty::U64,
        t => t,
    }
}

/// The PTX text of a CUDA fatbin (the newest PTX entry for sm ≤ 90), or the image itself when
/// it is PTX text. Compressed entries are refused with a hint (build.rs writes them plain).
pub fn ptx_of_image(image: &[u8]) -> Result<String, String> {
    const MAGIC: u32 = 0xBA55_ED50;
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|x| u16::from_le_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], o: usize| b.get(o..o + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
    let u64_at = |b: &[u8], o: usize| b.get(o..o + 8).map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8])));
    if u32_at(image, 0) != Some(MAGIC) {
        let end = image.iter().position(|&c| c == 0).unwrap_or(image.len());
        let text =
            std::str::from_utf8(&image[..end]).map_err(|_| "the image is neither a fatbin nor PTX text".to_string())?;
        if !text.contains(".entry") && !text.contains(".version") {
            return Err("the image is neither a fatbin nor PTX text".into());
        }
        return Ok(text.to_string());
    }
    let header = u16_at(image, 6).ok_or("truncated fatbin")? as usize;
    let size = u64_at(image, 8).ok_or("truncated fatbin")? as usize;
    let end = (header + size).min(image.len());
    let mut at = header;
    let mut best: Option<(u32, String)> = None;
    let mut compressed = false;
    while at + 16 <= end {
        let kind = u16_at(image, at).ok_or("truncated fatbin entry")?;
        let eh = u32_at(image, at + 4).ok_or("truncated fatbin entry")? as usize;
        let payload = u64_at(image, at + 8).ok_or("truncated fatbin entry")? as usize;
        // Entry header: kind u16, version u16, header size u32, payload size u64, compressed
        // size u32, u32, minor u16, major u16, arch u32, name offset u32, name length u32,
        // flags u64 (0x2000: compressed), ...
        let compressed_size = u32_at(image, at + 16).unwrap_or(0);
        let flags = u64_at(image, at + 40).unwrap_or(0);
        let arch = u32_at(image, at + 28).unwrap_or(0);
        if kind == 1 {
            // Flag bit 0x2000 marks a compressed payload.
            if flags & 0x2000 != 0 || compressed_size != 0 {
                compressed = true;
            } else if arch <= 90 && best.as_ref().is_none_or(|(a, _)| arch > *a) {
                let body =
                    image.get(at + eh..(at + eh + payload).min(image.len())).ok_or("truncated fatbin payload")?;
                let stop = body.iter().position(|&c| c == 0).unwrap_or(body.len());
                let text = std::str::from_utf8(&body[..stop]).map_err(|_| "fatbin PTX is not UTF-8".to_string())?;
                best = Some((arch, text.to_string()));
            }
        }
        if eh == 0 {
            break;
        }
        at += eh + payload;
    }
    match best {
        Some((_, t)) => Ok(t),
        None if compressed => {
            Err("the fatbin's PTX is compressed: build it with `-compress-mode=none` (build.rs does)".into())
        }
        None => Err("the fatbin has no PTX for sm_90 or older: the emulator runs PTX, not SASS".into()),
    }
}
