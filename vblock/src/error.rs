//! The crate's error type.

/// Everything that can go wrong in vblock.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument (name, size, range).
    #[error("{0}")]
    Invalid(String),
    /// No volume or snapshot of that name.
    #[error("no such volume or snapshot: {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("already exists: {0}")]
    Exists(String),
    /// A write to a snapshot.
    #[error("{0} is a read-only snapshot")]
    ReadOnly(String),
    /// An access beyond a volume's end.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The pool has no free space for a write that needs some (ENOSPC).
    #[error("no space left in the pool")]
    NoSpace,
    /// Metadata on disk is damaged: which structure, and how.
    #[error("corrupt pool: {0}")]
    Corrupt(String),
    /// The device is not a pool of a version we read.
    #[error("not a vblock pool: {0}")]
    NotAPool(String),
    /// The pool file is open elsewhere (a pool has one opener); the message names the holder.
    #[error("{0}")]
    InUse(String),
    /// An I/O error, with what was being done.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

impl Error {
    /// The errno a block protocol would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::OutOfRange(_) | Error::Invalid(_) => libc::EINVAL,
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::InUse(_) => libc::EBUSY,
            Error::Corrupt(_) | Error::NotAPool(_) | Error::Io(..) => libc::EIO,
        }
    }
}
