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
    /// Metadata on disk is damaged: which structure, where, and how.
    #[error("corrupt pool: {0}")]
    Corrupt(Corruption),
    /// The device is not a pool of a version we read.
    #[error("not a vblock pool: {0}")]
    NotAPool(String),
    /// The pool file is open elsewhere (a pool has one opener); the message names the holder.
    #[error("{0}")]
    InUse(String),
    /// Writes that were carried out but whose metadata commit failed (the commit is retried
    /// with the next one); the commit's error is the source.
    #[error("committing the metadata failed")]
    Commit(#[source] std::sync::Arc<Error>),
    /// An I/O error, with what was being done.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// The on-disk structures of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    /// One of the two superblocks.
    Superblock,
    /// The checkpoint area (tree nodes and volume records).
    Checkpoint,
    /// The journal (transactions of records).
    Journal,
    /// The volumes and mappings the checkpoint and journal describe, once read.
    Metadata,
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Structure::Superblock => "superblock",
            Structure::Checkpoint => "checkpoint",
            Structure::Journal => "journal",
            Structure::Metadata => "metadata",
        })
    }
}

/// Where metadata on disk is damaged, and how ([`Error::Corrupt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// The structure that is damaged.
    pub structure: Structure,
    /// Byte offset on the device of the damaged block, when known.
    pub offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.structure)?;
        if let Some(offset) = self.offset {
            write!(f, " at byte {offset}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl Error {
    /// Damage in `structure`, at an offset not known yet (see [`Self::at`]).
    pub fn corrupt(structure: Structure, detail: impl Into<String>) -> Error {
        Error::Corrupt(Corruption {
            structure,
            offset: None,
            detail: detail.into(),
        })
    }

    /// Damage in `structure` at a byte offset relative to where that structure starts (the
    /// caller that knows the device adds its base with [`Self::at`]).
    pub fn corrupt_at(structure: Structure, offset: u64, detail: impl Into<String>) -> Error {
        Error::Corrupt(Corruption {
            structure,
            offset: Some(offset),
            detail: detail.into(),
        })
    }

    /// Places a corruption found in a structure read from device offset `base`: a relative
    /// offset becomes absolute, an unknown one becomes `base`. Other errors pass unchanged.
    pub fn at(self, base: u64) -> Error {
        match self {
            Error::Corrupt(mut c) => {
                c.offset = Some(base + c.offset.unwrap_or(0));
                Error::Corrupt(c)
            }
            other => other,
        }
    }

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
            Error::Commit(source) => source.errno(),
        }
    }
}
