//! One error type for the whole crate. Messages name the thing: file, tensor, item, op.

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An I/O failure on a named file.
    Io { path: PathBuf, source: std::io::Error },
    /// A file whose content is not what it claims (corrupt, truncated, wrong dtype or shape).
    Format { path: PathBuf, what: String },
    /// A tensor with the wrong shape for an op or a layer.
    Shape { op: &'static str, what: String },
    /// A tensor of an element type the op does not take (a bf16 tensor given to an f32 op).
    Type { op: &'static str, what: String },
    /// Bad input data: out-of-range id or label, non-finite feature, inconsistent lengths.
    Data { what: String },
    /// A bad configuration value or command-line argument.
    Config { what: String },
    /// The requested device is not available (no GPU, build without CUDA, library missing).
    Device { what: String },
    /// Training diverged: the loss became NaN or infinite.
    NonFinite { what: String },
    /// An output refused because writing it would destroy something (not ours, an input, in use).
    Refused { path: PathBuf, what: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Format { path: path.into(), what: what.into() }
    }
    pub fn shape(op: &'static str, what: impl Into<String>) -> Self {
        Error::Shape { op, what: what.into() }
    }
    pub fn dtype(op: &'static str, what: impl Into<String>) -> Self {
        Error::Type { op, what: what.into() }
    }
    pub fn data(what: impl Into<String>) -> Self {
        Error::Data { what: what.into() }
    }
    pub fn config(what: impl Into<String>) -> Self {
        Error::Config { what: what.into() }
    }
    pub fn refused(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Refused { path: path.into(), what: what.into() }
    }
    /// A configuration error found in the file at `path` (a checkpoint that does not fit the
    /// data), naming it; any other error as it is.
    pub fn about(self, path: &std::path::Path) -> Self {
        match self {
            Error::Config { what } => Error::Config { what: format!("{}: {what}", path.display()) },
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, what } => write!(f, "{}: {what}", path.display()),
            Error::Shape { op, what } => write!(f, "{op}: shape mismatch: {what}"),
            Error::Type { op, what } => write!(f, "{op}: element type: {what}"),
            Error::Data { what } => write!(f, "bad input: {what}"),
            Error::Config { what } => write!(f, "configuration: {what}"),
            Error::Device { what } => write!(f, "device: {what}"),
            Error::NonFinite { what } => write!(f, "training diverged: {what}"),
            Error::Refused { path, what } => write!(f, "{}: {what}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
