//! NumPy `.npy` files of little-endian float32, C order: what FAISS, hnswlib and USearch load
//! (`numpy.load`), and what `index --vectors` / `query --vectors` read. Written by hand rather
//! than with a crate: the format is a 10-byte preamble, a Python-dict header and the raw data
//! (<https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>).

use std::path::Path;

use crate::io::{atomic_write, bytes_to_f32, read};
use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Where an npy export of `npy` puts its ids, one per line: `gallery.npy` → `gallery.ids.txt`
/// (any other name gets `.ids.txt` appended).
pub fn export_ids_path(npy: &Path) -> std::path::PathBuf {
    match npy.extension() {
        Some(e) if e == "npy" => npy.with_extension("ids.txt"),
        _ => {
            let mut name = npy.as_os_str().to_owned();
            name.push(".ids.txt");
            name.into()
        }
    }
}

/// A float32 array read from a `.npy` file: its shape and values (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct NpyF32 {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl NpyF32 {
    /// Refuses values that are not as many as the shape says.
    pub fn check(&self) -> Result<()> {
        Self::check_len(&self.shape, self.values.len())
    }

    fn check_len(shape: &[usize], len: usize) -> Result<()> {
        match shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
            Some(n) if n == len => Ok(()),
            _ => Err(Error::data(format!("an array of shape {shape:?} cannot hold {len} values"))),
        }
    }
}

/// The bytes of a version 1.0 `.npy` file holding `values` as float32 of `shape` (C order):
/// header padded with spaces to a multiple of 64 bytes, as NumPy writes it.
/// Values that are not the shape's count are an error.
pub fn npy_bytes(values: &[f32], shape: &[usize]) -> Result<Vec<u8>> {
    NpyF32::check_len(shape, values.len())?;
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    // A one-element tuple needs its trailing comma: `(5,)`.
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Writes `values` as a float32 `.npy` of `shape`, atomically.
pub fn write_npy(path: &Path, values: &[f32], shape: &[usize]) -> Result<()> {
    atomic_write(path, &npy_bytes(values, shape)?)
}

/// Reads a `.npy` of little-endian float32 in C order (versions 1 to 3). Refused, naming the
/// file: another dtype, Fortran order, a truncated or overlong data part, a malformed header,
/// an array with no values.
pub fn read_npy(path: &Path) -> Result<NpyF32> {
    parse_npy(&read(path)?).map_err(|what| Error::format(path, format!("not a usable float32 .npy file: {what}")))
}

/// [`read_npy`] of bytes in memory; the error says what is wrong.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyF32, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("no NUMPY magic at the start".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12),
        _ => return Err(format!("format version {major}.{minor} is not 1.0, 2.0 or 3.0")),
    };
    let header = bytes.get(start..start + len).ok_or("the header is cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "the header is not text")?;
    let descr = dict_value(header, "descr").ok_or("the header has no 'descr'")?;
    if descr != "'<f4'" {
        return Err(format!("dtype {descr}, expected '<f4' (little-endian float32): convert with .astype('<f4')"));
    }
    match dict_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => return Err("Fortran order: save a C-ordered array (numpy.ascontiguousarray)".into()),
        _ => return Err("the header has no valid 'fortran_order'".into()),
    }
    let shape = parse_shape(dict_value(header, "shape").ok_or("the header has no 'shape'")?)?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("the shape overflows")?;
    // Every use needs values; refused here, a zero dimension could not make another one's
    // size (ids for 2⁴⁰ rows of nothing) look backed by data.
    if count == 0 {
        return Err(format!("shape {shape:?} holds no values"));
    }
    let data = &bytes[start + len..];
    let want = count.checked_mul(4).ok_or("the shape overflows")?;
    if data.len() != want {
        let how = if data.len() < want { "truncated" } else { "longer than its shape" };
        return Err(format!("{how}: shape {shape:?} needs {want} data bytes, the file has {}", data.len()));
    }
    Ok(NpyF32 { shape, values: bytes_to_f32(data) })
}

/// The text of `'key': value` in a header dict, up to the next top-level comma or brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner =
        text.strip_prefix('(').and_then(|t| t.strip_suffix(')')).ok_or(format!("shape {text} is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().map_err(|_| format!("shape {text} has a bad dimension `{d}`")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_and_have_numpys_header_layout() {
        for shape in [vec![3, 2], vec![5], vec![2, 1, 3]] {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.25).collect();
            let bytes = npy_bytes(&values, &shape).unwrap();
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            assert_eq!(bytes[10 + header_len - 1], b'\n');
            assert_eq!(parse_npy(&bytes).unwrap(), NpyF32 { shape, values });
        }
        let one = String::from_utf8_lossy(&npy_bytes(&[1.0; 5], &[5]).unwrap()).into_owned();
        assert!(one.contains("'shape': (5,)"), "{one}");
    }

    #[test]
    fn other_dtypes_fortran_order_and_bad_lengths_are_refused() {
        let good = npy_bytes(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let err = |b: &[u8]| parse_npy(b).unwrap_err();
        let mut f8 = good.clone();
        let at = f8.windows(5).position(|w| w == b"'<f4'").unwrap();
        f8[at + 2..at + 4].copy_from_slice(b"f8");
        assert!(err(&f8).contains("dtype '<f8'"));
        let mut fortran = good.clone();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(err(&fortran).contains("Fortran order"));
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(err(&long).contains("longer than its shape"));
        assert!(err(b"not numpy at all").contains("magic"));
        assert!(err(&good[..12]).contains("cut short"));
        // No values: a zero dimension beside 2⁴⁰ rows (whose ids were once generated) or
        // beside the segments of features.
        assert!(err(&npy_bytes(&[], &[1 << 40, 0]).unwrap()).contains("holds no values"));
        assert!(err(&npy_bytes(&[], &[2, 0, 4]).unwrap()).contains("holds no values"));
    }
}
