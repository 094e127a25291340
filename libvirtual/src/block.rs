//! The typed client of vblockd's control API (see `docs/api.md`): pools, volumes, snapshots,
//! clones, I/O limits, data transfer.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vblock::api::{
    CheckInfo, CloneSpec, PoolInfo, PoolSpec, QosSpec, ResizeSpec, SnapshotSpec, VolumeInfo,
    VolumeSpec,
};

use crate::Error;
use crate::http::{call, check, request, text};

pub use vblock::api::{MAX_TRANSFER, default_socket};

/// A blocking client of one vblockd.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// All pools.
    pub fn pools(&self) -> Result<Vec<PoolInfo>, Error> {
        call(&self.socket, "GET", "/v1/pools", None::<&()>)
    }

    /// One pool.
    pub fn pool(&self, name: &str) -> Result<PoolInfo, Error> {
        call(
            &self.socket,
            "GET",
            &format!("/v1/pools/{name}"),
            None::<&()>,
        )
    }

    /// Creates (with a size) or opens (without) a pool and serves it.
    pub fn create_pool(&self, spec: &PoolSpec) -> Result<PoolInfo, Error> {
        call(&self.socket, "POST", "/v1/pools", Some(spec))
    }

    /// Stops serving a pool (its file stays).
    pub fn remove_pool(&self, name: &str) -> Result<(), Error> {
        call(
            &self.socket,
            "DELETE",
            &format!("/v1/pools/{name}"),
            None::<&()>,
        )
    }

    /// Verifies a pool; with `repair`, reclaims leaked space.
    pub fn check(&self, pool: &str, repair: bool) -> Result<CheckInfo, Error> {
        let body = serde_json::json!({ "repair": repair });
        call(
            &self.socket,
            "POST",
            &format!("/v1/pools/{pool}/check"),
            Some(&body),
        )
    }

    /// Makes everything written to a pool durable.
    pub fn flush(&self, pool: &str) -> Result<(), Error> {
        call(
            &self.socket,
            "POST",
            &format!("/v1/pools/{pool}/flush"),
            None::<&()>,
        )
    }

    /// A pool's volumes, snapshots and clones.
    pub fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>, Error> {
        call(
            &self.socket,
            "GET",
            &format!("/v1/pools/{pool}/volumes"),
            None::<&()>,
        )
    }

    /// One of them.
    pub fn volume(&self, pool: &str, name: &str) -> Result<VolumeInfo, Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}");
        call(&self.socket, "GET", &path, None::<&()>)
    }

    /// Creates a thin volume.
    pub fn create_volume(&self, pool: &str, spec: &VolumeSpec) -> Result<VolumeInfo, Error> {
        call(
            &self.socket,
            "POST",
            &format!("/v1/pools/{pool}/volumes"),
            Some(spec),
        )
    }

    /// Deletes a volume, snapshot or clone.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<(), Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}");
        call(&self.socket, "DELETE", &path, None::<&()>)
    }

    /// Grows a volume.
    pub fn resize(&self, pool: &str, name: &str, size: u64) -> Result<VolumeInfo, Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}/resize");
        call(&self.socket, "POST", &path, Some(&ResizeSpec { size }))
    }

    /// Sets a volume's I/O limits (0: unlimited).
    pub fn set_qos(&self, pool: &str, name: &str, qos: QosSpec) -> Result<VolumeInfo, Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}/qos");
        call(&self.socket, "PUT", &path, Some(&qos))
    }

    /// Takes a snapshot of `source`.
    pub fn snapshot(&self, pool: &str, source: &str, name: &str) -> Result<VolumeInfo, Error> {
        let spec = SnapshotSpec {
            source: source.into(),
            name: name.into(),
        };
        call(
            &self.socket,
            "POST",
            &format!("/v1/pools/{pool}/snapshots"),
            Some(&spec),
        )
    }

    /// Clones a snapshot.
    pub fn clone_snapshot(
        &self,
        pool: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<VolumeInfo, Error> {
        let spec = CloneSpec {
            snapshot: snapshot.into(),
            name: name.into(),
        };
        call(
            &self.socket,
            "POST",
            &format!("/v1/pools/{pool}/clones"),
            Some(&spec),
        )
    }

    /// Reads `length` bytes at `offset` (at most [`MAX_TRANSFER`]).
    pub fn read(&self, pool: &str, name: &str, offset: u64, length: u64) -> Result<Vec<u8>, Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}/data?offset={offset}&length={length}");
        Ok(check(request(&self.socket, "GET", &path, None)?)?.body)
    }

    /// Writes `data` at `offset` (durable after [`Self::flush`]).
    pub fn write(&self, pool: &str, name: &str, offset: u64, data: &[u8]) -> Result<(), Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}/data?offset={offset}");
        check(request(&self.socket, "PUT", &path, Some(data))?)?;
        Ok(())
    }

    /// Zeroes `length` bytes at `offset` (whole 4 KiB blocks are released).
    pub fn write_zeroes(
        &self,
        pool: &str,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<(), Error> {
        let path = format!("/v1/pools/{pool}/volumes/{name}/zero?offset={offset}&length={length}");
        check(request(&self.socket, "POST", &path, None)?)?;
        Ok(())
    }

    /// Where `to` differs from `from` (or, without, everything `to` maps).
    pub fn diff(
        &self,
        pool: &str,
        to: &str,
        from: Option<&str>,
    ) -> Result<Vec<vblock::DiffRange>, Error> {
        let q = from.map(|f| format!("?from={f}")).unwrap_or_default();
        call(
            &self.socket,
            "GET",
            &format!("/v1/pools/{pool}/volumes/{to}/diff{q}"),
            None::<&()>,
        )
    }

    /// Exports a volume (a snapshot read-only) to VMs as vhost-user-blk.
    pub fn export_vhost(
        &self,
        pool: &str,
        volume: &str,
        queues: usize,
    ) -> Result<vblock::api::VhostInfo, Error> {
        let path = format!("/v1/pools/{pool}/volumes/{volume}/vhost");
        call(
            &self.socket,
            "PUT",
            &path,
            Some(&vblock::api::VhostSpec { queues }),
        )
    }

    /// Stops a vhost-user export.
    pub fn unexport_vhost(&self, pool: &str, volume: &str) -> Result<(), Error> {
        let path = format!("/v1/pools/{pool}/volumes/{volume}/vhost");
        call(&self.socket, "DELETE", &path, None::<&()>)
    }

    /// Running vhost-user exports.
    pub fn vhost_exports(&self) -> Result<Vec<vblock::api::VhostInfo>, Error> {
        call(&self.socket, "GET", "/v1/vhost", None::<&()>)
    }

    /// The Prometheus text of every counter.
    pub fn metrics(&self) -> Result<String, Error> {
        text(&self.socket, "/metrics")
    }

    /// Copies `len` bytes of a raw image from `image` into volume `name` (created with the
    /// image's size rounded up to 512 if missing; an existing one must be large enough) and
    /// commits it. Runs of zero 4 KiB blocks are not sent: they stay unallocated (and are
    /// released in an existing volume). `progress` hears the bytes done after every chunk.
    pub fn import(
        &self,
        pool: &str,
        name: &str,
        image: &mut impl Read,
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let size = len.div_ceil(512) * 512;
        let existed = match self.volume(pool, name) {
            Ok(v) if v.size < size => {
                return Err(Error::Protocol(format!(
                    "{len} bytes do not fit volume {name} ({} bytes)",
                    v.size
                )));
            }
            Ok(_) => true,
            Err(Error::Api { code, .. }) if code == "not_found" => {
                let spec = VolumeSpec {
                    name: name.to_owned(),
                    size,
                };
                self.create_volume(pool, &spec)?;
                false
            }
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; TRANSFER_CHUNK as usize];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(TRANSFER_CHUNK) as usize;
            image
                .read_exact(&mut buf[..n])
                .map_err(|e| Error::Protocol(format!("reading the image at {off}: {e}")))?;
            let padded = n.div_ceil(512) * 512;
            buf[n..padded].fill(0);
            let mut at = 0;
            while at < padded {
                let zero = |i: usize| buf[i..(i + 4096).min(padded)].iter().all(|b| *b == 0);
                let start = at;
                let run_is_zero = zero(at);
                while at < padded && zero(at) == run_is_zero {
                    at += 4096;
                }
                let end = at.min(padded);
                if !run_is_zero {
                    self.write(pool, name, off + start as u64, &buf[start..end])?;
                } else if existed {
                    // The volume may hold data there: zero it (released).
                    self.write_zeroes(pool, name, off + start as u64, (end - start) as u64)?;
                }
            }
            off += n as u64;
            progress(off);
        }
        self.flush(pool)?;
        self.volume(pool, name)
    }

    /// Copies volume (or snapshot) `name` whole into `image` as a raw image, leaving holes
    /// (seeking past them) where it reads zeros; `progress` hears the bytes done after every
    /// chunk. The caller syncs the file.
    pub fn export(
        &self,
        pool: &str,
        name: &str,
        image: &mut (impl Write + Seek),
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let v = self.volume(pool, name)?;
        let werr = |e: std::io::Error| Error::Protocol(format!("writing the image: {e}"));
        let mut off = 0u64;
        while off < v.size {
            let n = (v.size - off).min(TRANSFER_CHUNK);
            let data = self.read(pool, name, off, n)?;
            if data.len() as u64 != n {
                return Err(Error::Protocol(format!("short read at {off}")));
            }
            if data.iter().all(|b| *b == 0) {
                image.seek(SeekFrom::Current(n as i64)).map_err(werr)?;
            } else {
                image.write_all(&data).map_err(werr)?;
            }
            off += n;
            progress(off);
        }
        Ok(v)
    }
}

/// Bytes per request of [`Client::import`] and [`Client::export`].
pub const TRANSFER_CHUNK: u64 = 4 << 20;
