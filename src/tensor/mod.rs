//! Device tensors: a shape plus storage on one backend.
//!
//! Activations are `Tensor`s of f32 or bf16 ([`DType`]; row-major, last dimension
//! contiguous). Index data (token ids, segment offsets, class targets) are `Ids` of u32. Both are owned by the
//! caller; a backend only allocates, reads and writes them. Parameters are not tensors of
//! their own: they are ranges of one flat buffer (`crate::nn::params`), passed to ops as views.

#[cfg(feature = "cuda")]
pub mod device;
mod dtype;
pub mod host_pool;

pub use dtype::{DType, bf16_bits};
pub use host_pool::HostBuf;

use std::sync::Arc;

/// Where the numbers live. The CUDA backend adds its own variant.
///
/// A CPU tensor's buffer is f32 words: an f32 tensor's values, or a bf16 tensor's values in
/// 2 bytes each, two to a word (⌈len / 2⌉ words), so that both kinds share the buffer pool
/// (`host_pool`) and a frozen model's memory. A pooled buffer starts on a 64-byte line
/// ([`HostBuf`]).
#[derive(Debug)]
pub enum Storage {
    Cpu(HostBuf),
    /// Host memory no one writes again ([`Tensor::freeze`]: a loaded model's parameters), so a
    /// backend may keep what it derives from it for as long as the memory lives.
    CpuFrozen(Arc<[f32]>),
    #[cfg(feature = "cuda")]
    Cuda(device::DevBuf),
}

#[derive(Clone, Debug)]
pub enum IdStorage {
    Cpu(Vec<u32>),
    #[cfg(feature = "cuda")]
    Cuda(device::DevIds),
}

#[derive(Debug)]
pub struct Tensor {
    pub(crate) storage: Storage,
    shape: Vec<usize>,
    dtype: DType,
}

/// u32 index data on a device: token ids, targets, segment offsets.
#[derive(Clone, Debug)]
pub struct Ids {
    pub(crate) storage: IdStorage,
}

/// A borrowed contiguous range of device memory: a parameter inside the flat buffer, or a
/// whole tensor. Views are slices, so disjoint mutable views (a weight's and a bias's gradient)
/// can coexist. A view keeps its tensor's [`DType`]: `CpuBf16` is a bf16 tensor's range on the
/// CPU (each value's 16 bits: `bf16_bits`), a device view carries its own.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    Cpu(&'a [f32]),
    CpuBf16(&'a [u16]),
    #[cfg(feature = "cuda")]
    Cuda(device::DevView<'a>),
}

#[derive(Debug)]
pub enum ViewMut<'a> {
    Cpu(&'a mut [f32]),
    CpuBf16(&'a mut [u16]),
    #[cfg(feature = "cuda")]
    Cuda(device::DevViewMut<'a>),
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        let storage = match &self.storage {
            Storage::Cpu(v) => {
                let mut c = host_pool::dirty(v.len());
                c.copy_from_slice(v);
                Storage::Cpu(c)
            }
            Storage::CpuFrozen(v) => Storage::CpuFrozen(Arc::clone(v)),
            // Clone cannot return an error: a device copy that fails (out of memory) panics
            // with the driver's message. The model clones only small activations.
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Storage::Cuda(b.try_clone().unwrap_or_else(|e| panic!("cloning a CUDA tensor: {e}"))),
        };
        Tensor { storage, shape: self.shape.clone(), dtype: self.dtype }
    }
}

/// CPU buffers go back to the pool they came from.
impl Drop for Tensor {
    fn drop(&mut self) {
        match &mut self.storage {
            Storage::Cpu(v) => host_pool::give(std::mem::take(v)),
            Storage::CpuFrozen(_) => {}
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {} // DevBuf's own drop returns the block to its pool
        }
    }
}

impl Tensor {
    /// An f32 CPU tensor over `data`: a `Vec<f32>` (taken as it is, not copied) or a pooled
    /// [`HostBuf`].
    pub fn from_cpu(data: impl Into<HostBuf>, shape: &[usize]) -> Tensor {
        let data = data.into();
        assert_eq!(data.len(), shape.iter().product::<usize>(), "tensor data does not match shape {shape:?}");
        Tensor { storage: Storage::Cpu(data), shape: shape.to_vec(), dtype: DType::F32 }
    }

    /// A CPU tensor of `dtype` holding `data` as that type stores it (bf16: each value
    /// rounded, [`DType::round`], and kept in 2 bytes).
    pub fn from_cpu_as(data: impl Into<HostBuf>, shape: &[usize], dtype: DType) -> Tensor {
        let t = Tensor::from_cpu(data, shape);
        if dtype == DType::F32 {
            return t;
        }
        let mut bits = Tensor::cpu_dirty(shape, dtype);
        narrow(t.cpu(), bits.cpu_bf16_mut());
        bits
    }

    /// A CPU tensor of `dtype` over a pooled buffer whose old contents are still there: every
    /// element is the caller's to write (a backend's output).
    pub(crate) fn cpu_dirty(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_cpu_words(host_pool::dirty(cpu_words(shape.iter().product(), dtype)), shape, dtype)
    }

    /// A CPU tensor of `dtype` over `words`, its buffer as `Storage` lays it out (bf16: two
    /// values to a word); the contents are the caller's (a backend's output buffer).
    pub(crate) fn from_cpu_words(words: HostBuf, shape: &[usize], dtype: DType) -> Tensor {
        let need = cpu_words(shape.iter().product(), dtype);
        assert_eq!(words.len(), need, "tensor buffer does not match shape {shape:?} of {}", dtype.name());
        Tensor { storage: Storage::Cpu(words), shape: shape.to_vec(), dtype }
    }

    /// A tensor over storage a backend allocated (`len(storage) == shape.product()`); a device
    /// buffer's type is the tensor's, a CPU buffer's is f32.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        let dtype = match &storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.dtype(),
            _ => DType::F32,
        };
        Tensor { storage, shape: shape.to_vec(), dtype }
    }

    /// How this tensor stores its elements.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This tensor, never to be written again: a CPU tensor's memory becomes shared and
    /// read-only, so that what a backend derives from it (`Backend::freeze`) stays right for
    /// as long as the memory lives. A device tensor is returned as it is. Writing to a frozen
    /// tensor is a programming error: it panics.
    pub fn freeze(mut self) -> Tensor {
        if let Storage::Cpu(v) = &mut self.storage {
            let v = std::mem::take(v);
            self.storage = Storage::CpuFrozen(Arc::from(&v[..]));
            host_pool::give(v);
        }
        self
    }

    /// The memory of a frozen CPU tensor ([`Tensor::freeze`]).
    pub fn frozen(&self) -> Option<&Arc<[f32]>> {
        match &self.storage {
            Storage::CpuFrozen(v) => Some(v),
            _ => None,
        }
    }

    /// The device this tensor lives on: "cpu" or "cuda".
    pub fn device(&self) -> &'static str {
        match &self.storage {
            Storage::Cpu(_) | Storage::CpuFrozen(_) => "cpu",
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => "cuda",
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of a 2-d view of the tensor: all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)].iter().product()
    }

    /// The last dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Same storage, another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Tensor {
        assert_eq!(self.len(), shape.iter().product::<usize>(), "reshape {:?} -> {shape:?}", self.shape);
        self.shape = shape.to_vec();
        self
    }

    pub fn view(&self) -> View<'_> {
        let n = self.len();
        self.sub(0, n)
    }

    pub fn view_mut(&mut self) -> ViewMut<'_> {
        let n = self.len();
        self.sub_mut(0, n)
    }

    /// The contiguous range `offset..offset + len` (a parameter inside the flat buffer).
    pub fn sub(&self, offset: usize, len: usize) -> View<'_> {
        match &self.storage {
            Storage::Cpu(_) | Storage::CpuFrozen(_) => match self.dtype {
                DType::Bf16 => View::CpuBf16(&self.cpu_bf16()[offset..offset + len]),
                DType::F32 => View::Cpu(&self.cpu()[offset..offset + len]),
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => {
                assert!(offset + len <= b.len(), "range {offset}+{len} of a {}-element tensor", b.len());
                View::Cuda(b.view(offset, len))
            }
        }
    }

    pub fn sub_mut(&mut self, offset: usize, len: usize) -> ViewMut<'_> {
        let (dtype, n) = (self.dtype, self.len());
        match &mut self.storage {
            Storage::Cpu(v) => match cpu_view_mut(v, dtype, n) {
                ViewMut::CpuBf16(s) => ViewMut::CpuBf16(&mut s[offset..offset + len]),
                ViewMut::Cpu(s) => ViewMut::Cpu(&mut s[offset..offset + len]),
                #[cfg(feature = "cuda")]
                ViewMut::Cuda(_) => unreachable!("a CPU buffer's view"),
            },
            Storage::CpuFrozen(_) => panic!("{FROZEN_WRITTEN}"),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => {
                assert!(offset + len <= b.len(), "range {offset}+{len} of a {}-element tensor", b.len());
                ViewMut::Cuda(b.view_mut(offset, len))
            }
        }
    }

    /// Two disjoint mutable ranges at once (a weight's and a bias's gradient).
    pub fn sub_pair_mut(&mut self, a: (usize, usize), b: (usize, usize)) -> (ViewMut<'_>, ViewMut<'_>) {
        let [a, b] = self.subs_mut([a, b]);
        (a, b)
    }

    /// `N` disjoint mutable ranges (offset, len) at once, in the order given (a LayerNorm's
    /// gradients and the bias gradient of the sublayer before it).
    ///
    /// # Panics
    /// If two ranges overlap or one ends past the tensor.
    pub fn subs_mut<const N: usize>(&mut self, ranges: [(usize, usize); N]) -> [ViewMut<'_>; N] {
        let mut order: [usize; N] = std::array::from_fn(|i| i);
        order.sort_by_key(|&i| ranges[i].0);
        for pair in order.windows(2) {
            let (a, b) = (ranges[pair[0]], ranges[pair[1]]);
            assert!(a.0 + a.1 <= b.0, "overlapping ranges {a:?} {b:?}");
        }
        let mut out: [Option<ViewMut<'_>>; N] = std::array::from_fn(|_| None);
        let (dtype, n) = (self.dtype, self.len());
        match &mut self.storage {
            Storage::Cpu(v) => {
                let (mut rest, mut at) = (cpu_view_mut(v, dtype, n), 0);
                for &i in &order {
                    let (offset, len) = ranges[i];
                    let (_, tail) = rest.split_at(offset - at);
                    let (mine, tail) = tail.split_at(len);
                    out[i] = Some(mine);
                    (rest, at) = (tail, offset + len);
                }
            }
            Storage::CpuFrozen(_) => panic!("{FROZEN_WRITTEN}"),
            #[cfg(feature = "cuda")]
            Storage::Cuda(buf) => {
                let total = buf.len();
                let (mut rest, mut at) = (Some(buf.view_mut(0, total)), 0);
                for &i in &order {
                    let (offset, len) = ranges[i];
                    assert!(offset + len <= total, "range {offset}+{len} of a {total}-element tensor");
                    let (_, tail) = rest.take().expect("set each turn").split_at(offset - at);
                    let (mine, tail) = tail.split_at(len);
                    out[i] = Some(ViewMut::Cuda(mine));
                    (rest, at) = (Some(tail), offset + len);
                }
            }
        }
        out.map(|v| v.expect("every range is placed"))
    }

    /// Host data of an f32 CPU tensor. Panics on a device tensor: handing one backend's
    /// tensor to another is a programming error (download it first); and on a bf16 one
    /// ([`Tensor::cpu_bf16`], or [`Tensor::to_f32s`]).
    pub fn cpu(&self) -> &[f32] {
        assert_eq!(self.dtype, DType::F32, "{BF16_AS_F32}");
        self.words()
    }

    pub fn cpu_mut(&mut self) -> &mut [f32] {
        assert_eq!(self.dtype, DType::F32, "{BF16_AS_F32}");
        self.words_mut()
    }

    /// Host data of a bf16 CPU tensor: each value's 16 bits ([`bf16_bits`]).
    pub fn cpu_bf16(&self) -> &[u16] {
        assert_eq!(self.dtype, DType::Bf16, "an f32 tensor was read as bf16");
        let (words, len) = (self.words(), self.len());
        assert!(2 * words.len() >= len, "a bf16 tensor's buffer holds its values");
        // SAFETY: the words hold 2 · words.len() u16s (u16's alignment divides f32's), of
        // which the first len are the values; the borrow is the tensor's.
        unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u16, len) }
    }

    pub fn cpu_bf16_mut(&mut self) -> &mut [u16] {
        assert_eq!(self.dtype, DType::Bf16, "an f32 tensor was written as bf16");
        let len = self.len();
        match cpu_view_mut(self.words_mut(), DType::Bf16, len) {
            ViewMut::CpuBf16(s) => s,
            _ => unreachable!("a bf16 view"),
        }
    }

    /// A CPU tensor's values as f32, whichever its type (a bf16 value widened exactly).
    pub fn to_f32s(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.cpu().to_vec(),
            DType::Bf16 => {
                let mut wide = vec![0.0; self.len()];
                widen(self.cpu_bf16(), &mut wide);
                wide
            }
        }
    }

    fn words(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
            Storage::CpuFrozen(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => panic!("a CUDA tensor was used as a CPU tensor"),
        }
    }

    fn words_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
            Storage::CpuFrozen(_) => panic!("{FROZEN_WRITTEN}"),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => panic!("a CUDA tensor was used as a CPU tensor"),
        }
    }
}

const FROZEN_WRITTEN: &str = "a frozen tensor (a loaded model's parameters) was written";
const BF16_AS_F32: &str = "a bf16 tensor was used as an f32 one";

/// The f32 words `Storage::Cpu` takes for `n` values of `dtype` (bf16: two to a word).
fn cpu_words(n: usize, dtype: DType) -> usize {
    if dtype == DType::Bf16 { n.div_ceil(2) } else { n }
}

/// The whole of a CPU buffer of `len` values of `dtype` (`Storage`'s layout).
fn cpu_view_mut(words: &mut [f32], dtype: DType, len: usize) -> ViewMut<'_> {
    match dtype {
        DType::F32 => ViewMut::Cpu(&mut words[..len]),
        DType::Bf16 => {
            assert!(2 * words.len() >= len, "a bf16 tensor's buffer holds its values");
            // SAFETY: the words hold 2 · words.len() u16s (u16's alignment divides f32's), of
            // which the first len are the values; the borrow is unique.
            ViewMut::CpuBf16(unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, len) })
        }
    }
}

/// `wide[i]` = the f32 whose high half is `bits[i]` (exact: every bf16 is an f32).
pub fn widen(bits: &[u16], wide: &mut [f32]) {
    for (w, &b) in wide.iter_mut().zip(bits) {
        *w = f32::from_bits((b as u32) << 16);
    }
}

/// `bits[i]` = `wide[i]` rounded to bf16 ([`bf16_bits`]).
pub fn narrow(wide: &[f32], bits: &mut [u16]) {
    for (b, &w) in bits.iter_mut().zip(wide) {
        *b = bf16_bits(w);
    }
}

impl Ids {
    pub fn from_cpu(data: Vec<u32>) -> Ids {
        Ids { storage: IdStorage::Cpu(data) }
    }

    pub fn len(&self) -> usize {
        match &self.storage {
            IdStorage::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            IdStorage::Cuda(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cpu(&self) -> &[u32] {
        match &self.storage {
            IdStorage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            IdStorage::Cuda(_) => panic!("CUDA index data was used as CPU index data"),
        }
    }
}

impl<'a> View<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            View::Cpu(_) => DType::F32,
            View::CpuBf16(_) => DType::Bf16,
            #[cfg(feature = "cuda")]
            View::Cuda(d) => d.dtype(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            View::Cpu(s) => s.len(),
            View::CpuBf16(s) => s.len(),
            #[cfg(feature = "cuda")]
            View::Cuda(d) => d.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// An f32 CPU view's values (panics on a bf16 or device view, as [`Tensor::cpu`]).
    pub fn cpu(self) -> &'a [f32] {
        match self {
            View::Cpu(s) => s,
            View::CpuBf16(_) => panic!("{BF16_AS_F32}"),
            #[cfg(feature = "cuda")]
            View::Cuda(_) => panic!("a CUDA view was used as a CPU view"),
        }
    }
}

impl<'a> ViewMut<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            ViewMut::Cpu(_) => DType::F32,
            ViewMut::CpuBf16(_) => DType::Bf16,
            #[cfg(feature = "cuda")]
            ViewMut::Cuda(d) => d.dtype(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            ViewMut::Cpu(s) => s.len(),
            ViewMut::CpuBf16(s) => s.len(),
            #[cfg(feature = "cuda")]
            ViewMut::Cuda(d) => d.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// An f32 CPU view's values (panics on a bf16 or device view, as [`Tensor::cpu_mut`]).
    pub fn cpu(self) -> &'a mut [f32] {
        match self {
            ViewMut::Cpu(s) => s,
            ViewMut::CpuBf16(_) => panic!("{BF16_AS_F32}"),
            #[cfg(feature = "cuda")]
            ViewMut::Cuda(_) => panic!("a CUDA view was used as a CPU view"),
        }
    }
    /// Two disjoint ranges: `..mid` and `mid..`.
    pub fn split_at(self, mid: usize) -> (ViewMut<'a>, ViewMut<'a>) {
        match self {
            ViewMut::Cpu(s) => {
                let (a, b) = s.split_at_mut(mid.min(s.len()));
                (ViewMut::Cpu(a), ViewMut::Cpu(b))
            }
            ViewMut::CpuBf16(s) => {
                let (a, b) = s.split_at_mut(mid.min(s.len()));
                (ViewMut::CpuBf16(a), ViewMut::CpuBf16(b))
            }
            #[cfg(feature = "cuda")]
            ViewMut::Cuda(d) => {
                let (a, b) = d.split_at(mid);
                (ViewMut::Cuda(a), ViewMut::Cuda(b))
            }
        }
    }
    pub fn reborrow(&mut self) -> ViewMut<'_> {
        match self {
            ViewMut::Cpu(s) => ViewMut::Cpu(s),
            ViewMut::CpuBf16(s) => ViewMut::CpuBf16(s),
            #[cfg(feature = "cuda")]
            ViewMut::Cuda(d) => ViewMut::Cuda(d.reborrow()),
        }
    }
}
