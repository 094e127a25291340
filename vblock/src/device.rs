//! What a pool lives on: a file or block device opened with O_DIRECT, or memory (tests).
//!
//! The contract is a disk with a volatile write cache: a write may be lost on a crash until a
//! [`Device::flush`] that follows it completes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::Error;
use crate::format::BLOCK_SIZE;

/// One request of a batch.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Read into the buffer at an offset.
    Read(u64, &'a mut [u8]),
    /// Write the buffer at an offset.
    Write(u64, &'a [u8]),
}

/// Block storage with a volatile write cache. Offsets and lengths are multiples of 512.
pub trait Device: Send + Sync {
    /// Carries out a batch of independent requests (in any order, possibly at once).
    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        for op in ops.iter_mut() {
            match op {
                IoOp::Read(off, buf) => self.read_at(*off, buf)?,
                IoOp::Write(off, buf) => self.write_at(*off, buf)?,
            }
        }
        Ok(())
    }
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Grows the device to `size` bytes, durably (a pool file is extended and its space
    /// reserved). Devices that cannot grow say so.
    fn grow(&self, size: u64) -> io::Result<()> {
        let _ = size;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this device cannot grow",
        ))
    }
}

/// A device in memory.
#[derive(Debug)]
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> MemDevice {
        MemDevice {
            data: Mutex::new(vec![0; size as usize]),
        }
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemDevice {
        MemDevice {
            data: Mutex::new(bytes),
        }
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset}: beyond the device ({size} bytes)"),
        )),
    }
}

impl Device for MemDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let r = range(offset, buf.len(), d.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let r = range(offset, buf.len(), d.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let size = usize::try_from(size).map_err(|_| io::Error::other("too large"))?;
        if size > data.len() {
            data.resize(size, 0);
        }
        Ok(())
    }
}

pub use vblock_api::Preallocation;

/// Creates (or truncates) a pool file of `size` bytes, its space reserved on the host.
pub(crate) fn create_pool_file(
    path: &Path,
    size: u64,
    preallocation: Preallocation,
) -> Result<(), Error> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::Io(format!("create {}", path.display()), e))?;
    // The pool's space is reserved on the host file system (volumes inside are thin): a pool
    // never runs out of host space behind its own back, and a first write into thin space
    // does not make the host file system allocate too. Where fallocate is not supported the
    // file stays sparse.
    let size_i64 = i64::try_from(size).map_err(|_| Error::Invalid(format!("pool size {size}")))?;
    match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, size_i64) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP) => f
            .set_len(size)
            .map_err(|e| Error::Io(format!("size {}", path.display()), e))?,
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(Error::Io(
                format!("reserving {size} bytes for {}", path.display()),
                e.into(),
            ));
        }
    }
    if preallocation == Preallocation::Full {
        let zeros = vec![0u8; 8 << 20];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], at)
                .map_err(|e| Error::Io(format!("writing zeros to {}", path.display()), e))?;
            at += n as u64;
        }
        f.sync_data()
            .map_err(|e| Error::Io(format!("syncing {}", path.display()), e))?;
    }
    Ok(())
}

/// A 4 KiB-aligned page, as O_DIRECT wants its buffers.
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
pub(crate) struct Page(pub(crate) [u8; BLOCK_SIZE]);

/// A zeroed, 4 KiB-aligned buffer of at least `len` bytes (whole pages).
pub(crate) fn aligned_pages(len: usize) -> Vec<Page> {
    vec![Page([0; BLOCK_SIZE]); len.div_ceil(BLOCK_SIZE)]
}

/// A zeroed byte buffer aligned to 4 KiB: what O_DIRECT devices take without a bounce copy.
#[derive(Clone)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            pages: aligned_pages(len),
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.pages.as_mut_bytes()[..self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// A file or block device, opened with O_DIRECT (the page cache is bypassed; `flush` is
/// `fdatasync`, which also flushes the disk's cache).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    /// Opens an existing file or block device.
    pub fn open(path: &Path) -> Result<FileDevice, Error> {
        let io_err = |e| Error::Io(format!("open {}", path.display()), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(io_err)?;
        let size = Self::size_of(&file)
            .map_err(|e| Error::Io(format!("size of {}", path.display()), e))?;
        Ok(FileDevice { file, size })
    }

    /// Creates (or truncates) a file of `size` bytes and opens it.
    pub fn create(path: &Path, size: u64) -> Result<FileDevice, Error> {
        create_pool_file(path, size, Preallocation::Falloc)?;
        Self::open(path)
    }

    fn size_of(file: &File) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        // Works for regular files and block devices alike.
        f.seek(SeekFrom::End(0))
    }
}

/// Runs `io` on an aligned buffer of `len` bytes (for callers whose buffer is not aligned).
fn with_aligned<R>(len: usize, io: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut pages = vec![Page([0; BLOCK_SIZE]); len.div_ceil(BLOCK_SIZE)];
    io(&mut pages.as_mut_bytes()[..len])
}

pub(crate) fn aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
}

impl Device for FileDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if aligned(buf) {
            return self.file.read_exact_at(buf, offset);
        }
        with_aligned(buf.len(), |tmp| {
            self.file.read_exact_at(tmp, offset)?;
            buf.copy_from_slice(tmp);
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if aligned(buf) {
            return self.file.write_all_at(buf, offset);
        }
        with_aligned(buf.len(), |tmp| {
            tmp.copy_from_slice(buf);
            self.file.write_all_at(tmp, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> u64 {
        self.size
    }
}
