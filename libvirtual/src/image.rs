//! Disk images in and out of volumes, the way users have them: raw files and qcow2 images
//! (QEMU's format, read and written with the `imago` crate), both thin. The format of an
//! image to import is found by its magic; other formats (vmdk, vhdx, vdi, vpc, qed, LUKS) are
//! refused with the `qemu-img convert` command that makes them importable.
//!
//! qcow2 import: the image's guest-visible map is walked; only its data (plain or compressed
//! clusters) is read and written, all-zero blocks inside it are not stored, and unallocated
//! or zero clusters stay holes. Images with a backing file, an external data file or
//! encryption are refused, and so are qcow2 features the reader does not know (extended L2
//! entries, zstd compression, a dirty image), each with the command that converts the image.
//! qcow2 export: a new image (64 KiB clusters, no compression) holding only what the volume
//! maps, so unwritten ranges stay unallocated.
//!
//! Blocking: these run the blocking [`Client`]; call them outside an async runtime.

use std::io::Read;
use std::path::Path;

use imago::file::File as ImageFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, Mapping, Storage, StorageCreateOptions,
};
use vblock_api::{VolumeInfo, VolumeSpec};

use crate::Error;
use crate::block::{Client, TRANSFER_CHUNK};

/// An image file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A raw disk image: the disk's bytes, as they are (holes where the file is sparse).
    Raw,
    /// A qcow2 image (version 2 or 3).
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("image format {other:?}: raw or qcow2")),
        }
    }
}

/// qcow2's magic, `QFI\xfb`.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The cluster size of exported qcow2 images (QEMU's default).
const EXPORT_CLUSTER: usize = 64 << 10;

fn file_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{}: {what}", path.display());
    move |source| Error::File { what, source }
}

/// What `path` holds, by its magic: raw or qcow2; a format that cannot be imported is an
/// error naming the `qemu-img convert` command that makes it importable.
pub fn detect(path: &Path) -> Result<Format, Error> {
    let mut f = std::fs::File::open(path).map_err(file_err(path, "opening"))?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(file_err(path, "reading"))? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    let other = |name: &str| {
        Err(Error::Refused(format!(
            "{} is a {name} image; import takes raw or qcow2 images: convert it first with \
             qemu-img convert -O qcow2 {} disk.qcow2",
            path.display(),
            path.display()
        )))
    };
    if head.starts_with(QCOW2_MAGIC) {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(2 | 3) => Ok(Format::Qcow2),
            Some(v) => other(&format!("qcow (version {v})")),
            None => Err(Error::Refused(format!(
                "{}: a truncated qcow2 header",
                path.display()
            ))),
        };
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return other("vmdk");
    }
    if head.starts_with(b"vhdxfile") {
        return other("vhdx");
    }
    if head.starts_with(b"conectix") {
        return other("vpc (VHD)");
    }
    if head.starts_with(b"QED\0") {
        return other("qed");
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return other("LUKS-encrypted");
    }
    if head.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return other("vdi");
    }
    Ok(Format::Raw)
}

/// The virtual size of the image at `path` (a raw file's length): what an import fills.
pub fn virtual_size(path: &Path, format: Format) -> Result<u64, Error> {
    match format {
        Format::Raw => Ok(std::fs::metadata(path)
            .map_err(file_err(path, "reading its size"))?
            .len()),
        Format::Qcow2 => Ok(open_qcow2(path)?.size()),
    }
}

/// Opens a qcow2 image for reading: only the image file itself (never a backing or data
/// file it names), refusing what cannot be read faithfully.
fn open_qcow2(path: &Path) -> Result<FormatAccess<ImageFile>, Error> {
    let convert = |why: String| {
        Error::Refused(format!(
            "{}: {why}; make a self-contained image first: qemu-img convert -O qcow2 -o \
             extended_l2=off,compression_type=zlib {} flat.qcow2",
            path.display(),
            path.display()
        ))
    };
    // Encryption is in the header (big-endian crypt_method at byte 32); imago would hand out
    // the encrypted bytes.
    let mut header = [0u8; 36];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(file_err(path, "reading the qcow2 header"))?;
    let crypt = u32::from_be_bytes([header[32], header[33], header[34], header[35]]);
    if crypt != 0 {
        return Err(convert(format!(
            "an encrypted qcow2 image (method {crypt})"
        )));
    }
    let q = Qcow2::<ImageFile>::open_path(path, false).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            convert(format!("a qcow2 image this reader cannot read: {e}"))
        } else {
            Error::File {
                what: format!("{}: opening the qcow2 image", path.display()),
                source: e,
            }
        }
    })?;
    if let Some(backing) = q.implicit_backing_file() {
        return Err(convert(format!(
            "a qcow2 image with a backing file ({backing}): backing chains are not imported"
        )));
    }
    if q.requires_external_data_file() {
        return Err(convert("a qcow2 image with an external data file".into()));
    }
    Ok(FormatAccess::new(q))
}

/// A run of a qcow2 image's guest-visible map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Data stored in the image (plain or compressed clusters).
    Data,
    /// Reads as zeros: unallocated, or a zero cluster.
    Zero,
}

/// The image's map as runs `(offset, length, run)`, adjacent ones of a kind merged.
fn qcow2_runs(img: &FormatAccess<ImageFile>, path: &Path) -> Result<Vec<(u64, u64, Run)>, Error> {
    let size = img.size();
    let mut runs: Vec<(u64, u64, Run)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (mapping, len) = img
            .get_mapping(off, size - off)
            .map_err(file_err(path, "reading the qcow2 map"))?;
        let run = match mapping {
            Mapping::Raw { .. } | Mapping::Special { .. } => Run::Data,
            Mapping::Zero { .. } => Run::Zero,
            Mapping::Eof { .. } => break,
            other => {
                return Err(Error::Refused(format!(
                    "{}: a qcow2 mapping this reader does not handle ({other:?})",
                    path.display()
                )));
            }
        };
        if len == 0 {
            break;
        }
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == off && last.2 == run => last.1 += len,
            _ => runs.push((off, len, run)),
        }
        off += len;
    }
    Ok(runs)
}

/// The volume to import into: created with `size` if it does not exist; an existing one must
/// be large enough. Returns whether it existed (its old data is then zeroed where the image
/// reads zeros).
fn target_volume(c: &Client, pool: &str, name: &str, size: u64) -> Result<bool, Error> {
    match c.volume(pool, name) {
        Ok(v) if v.size < size => Err(Error::Refused(format!(
            "the image's {size} bytes do not fit volume {name} ({} bytes)",
            v.size
        ))),
        Ok(_) => Ok(true),
        Err(Error::Api { code, .. }) if code == "not_found" => {
            let spec = VolumeSpec {
                name: name.to_owned(),
                size,
            };
            c.create_volume(pool, &spec)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Imports the image at `path` into volume `name` of `pool` (created with the image's
/// virtual size if it does not exist), thinly. `format` None: found by the file's magic.
/// `progress` hears the virtual bytes done.
pub fn import(
    c: &Client,
    pool: &str,
    name: &str,
    path: &Path,
    format: Option<Format>,
    progress: &mut dyn FnMut(u64),
) -> Result<VolumeInfo, Error> {
    let format = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    if format == Format::Raw {
        let mut f = std::fs::File::open(path).map_err(file_err(path, "opening"))?;
        let len = f
            .metadata()
            .map_err(file_err(path, "reading its size"))?
            .len();
        return c.import(pool, name, &mut f, len, progress);
    }
    let img = open_qcow2(path)?;
    let runs = qcow2_runs(&img, path)?;
    let size = img.size().div_ceil(512) * 512;
    let existed = target_volume(c, pool, name, size)?;
    let mut buf = vec![0u8; TRANSFER_CHUNK as usize];
    for (start, len, run) in runs {
        let end = start + len;
        let mut off = start;
        while off < end {
            let n = (end - off).min(TRANSFER_CHUNK);
            match run {
                Run::Data => {
                    let padded = (n.div_ceil(512) * 512) as usize;
                    buf[..padded].fill(0);
                    img.read(&mut buf[..n as usize], off)
                        .map_err(file_err(path, &format!("reading the image at {off}")))?;
                    c.write_thin(pool, name, off, &buf[..padded], existed)?;
                }
                Run::Zero if existed => {
                    c.write_zeroes(pool, name, off, n.div_ceil(512) * 512)?;
                }
                Run::Zero => {}
            }
            off += n;
            progress(off);
        }
    }
    c.flush(pool)?;
    c.volume(pool, name)
}

/// Exports volume (or snapshot) `name` of `pool` to a new image file at `path` (replacing
/// one that is there) in `format`, thinly: a raw file is sparse where the volume reads zeros;
/// a qcow2 image allocates only clusters the volume maps with data.
pub fn export(
    c: &Client,
    pool: &str,
    name: &str,
    path: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64),
) -> Result<VolumeInfo, Error> {
    if format == Format::Raw {
        let mut f = std::fs::File::create(path).map_err(file_err(path, "creating"))?;
        let v = c.export(pool, name, &mut f, progress)?;
        f.set_len(v.size)
            .and_then(|()| f.sync_all())
            .map_err(file_err(path, "writing"))?;
        return Ok(v);
    }
    let v = c.volume(pool, name)?;
    let file = ImageFile::create_open(
        StorageCreateOptions::new()
            .filename(path.to_string_lossy().into_owned())
            .overwrite(true),
    )
    .map_err(file_err(path, "creating"))?;
    let q = Qcow2::<ImageFile>::create_builder(file)
        .size(v.size)
        .cluster_size(EXPORT_CLUSTER)
        .create_open(DenyImplicitOpenGate::default(), |f| {
            Ok(Qcow2::<ImageFile>::builder(f).backing(None))
        })
        .map_err(file_err(path, "formatting the qcow2 image"))?;
    let img = FormatAccess::new(q);
    // Only what the volume maps, and of that only clusters that are not all zeros.
    for r in c.diff(pool, name, None)? {
        if r.zero {
            continue;
        }
        let end = r.offset + r.length;
        let mut off = r.offset;
        while off < end {
            let n = (end - off).min(TRANSFER_CHUNK);
            let data = c.read(pool, name, off, n)?;
            if data.len() as u64 != n {
                return Err(Error::Protocol(format!("short read of {name} at {off}")));
            }
            let mut at = 0usize;
            while at < data.len() {
                // Cluster by cluster of the image (a run may start inside one).
                let here = off + at as u64;
                let step =
                    (EXPORT_CLUSTER - (here % EXPORT_CLUSTER as u64) as usize).min(data.len() - at);
                let piece = &data[at..at + step];
                if piece.iter().any(|b| *b != 0) {
                    img.write(piece, here)
                        .map_err(file_err(path, &format!("writing the image at {here}")))?;
                }
                at += step;
            }
            off += n;
            progress(off);
        }
    }
    img.flush().map_err(file_err(path, "writing"))?;
    drop(img);
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(file_err(path, "syncing"))?;
    Ok(v)
}
