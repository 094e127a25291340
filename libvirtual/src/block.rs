//! The typed clients of vblockd's control API (see `docs/api.md`): pools, volumes, snapshots,
//! clones, I/O limits, data transfer, image import and export. [`AsyncClient`], and
//! [`Client`], its blocking wrapper.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use vblock_api::{
    CheckInfo, CloneSpec, PoolInfo, PoolResizeSpec, PoolSpec, QosSpec, ResizeSpec, SnapshotSpec,
    SpaceSpec, VhostInfo, VhostSpec, VolumeInfo, VolumeSpec,
};

use crate::Error;
use crate::blocking::{SyncIo, blocking_client, blocking_methods};
use crate::http::seg;
use crate::http::{call, check, request, text};

pub use vblock_api::{MAX_TRANSFER, default_socket};

/// Bytes per request of [`AsyncClient::import`] and [`AsyncClient::export`].
pub const TRANSFER_CHUNK: u64 = 4 << 20;

/// An async client of one vblockd (any tokio runtime).
#[derive(Clone, Debug)]
pub struct AsyncClient {
    socket: PathBuf,
}

impl AsyncClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> AsyncClient {
        AsyncClient {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        call(&self.socket, "GET", path, None::<&()>).await
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<T, Error> {
        call(&self.socket, method, path, body).await
    }

    /// All pools.
    pub async fn pools(&self) -> Result<Vec<PoolInfo>, Error> {
        self.get("/v1/pools").await
    }

    /// One pool.
    pub async fn pool(&self, name: &str) -> Result<PoolInfo, Error> {
        self.get(&format!("/v1/pools/{name}", name = seg(name)))
            .await
    }

    /// Creates (with a size) or opens (without) a pool and serves it.
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<PoolInfo, Error> {
        self.send("POST", "/v1/pools", Some(spec)).await
    }

    /// Grows a pool online to `size` bytes (pools only grow); writes waiting for space go on.
    pub async fn resize_pool(&self, name: &str, size: u64) -> Result<PoolInfo, Error> {
        let path = format!("/v1/pools/{name}/resize", name = seg(name));
        self.send("POST", &path, Some(&PoolResizeSpec { size }))
            .await
    }

    /// Sets a pool's space settings: out-of-space policy and low-water mark (live, kept).
    pub async fn set_pool_space(&self, name: &str, space: &SpaceSpec) -> Result<PoolInfo, Error> {
        let path = format!("/v1/pools/{name}/space", name = seg(name));
        self.send("PUT", &path, Some(space)).await
    }

    /// Stops serving a pool (its file stays).
    pub async fn remove_pool(&self, name: &str) -> Result<(), Error> {
        self.send(
            "DELETE",
            &format!("/v1/pools/{name}", name = seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Verifies a pool; with `repair`, reclaims leaked space.
    pub async fn check(&self, pool: &str, repair: bool) -> Result<CheckInfo, Error> {
        let body = serde_json::json!({ "repair": repair });
        self.send(
            "POST",
            &format!("/v1/pools/{pool}/check", pool = seg(pool)),
            Some(&body),
        )
        .await
    }

    /// Makes everything written to a pool durable.
    pub async fn flush(&self, pool: &str) -> Result<(), Error> {
        self.send(
            "POST",
            &format!("/v1/pools/{pool}/flush", pool = seg(pool)),
            None::<&()>,
        )
        .await
    }

    /// A pool's volumes, snapshots and clones.
    pub async fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>, Error> {
        self.get(&format!("/v1/pools/{pool}/volumes", pool = seg(pool)))
            .await
    }

    /// One of them.
    pub async fn volume(&self, pool: &str, name: &str) -> Result<VolumeInfo, Error> {
        self.get(&format!(
            "/v1/pools/{pool}/volumes/{name}",
            pool = seg(pool),
            name = seg(name)
        ))
        .await
    }

    /// Creates a thin volume.
    pub async fn create_volume(&self, pool: &str, spec: &VolumeSpec) -> Result<VolumeInfo, Error> {
        let path = format!("/v1/pools/{pool}/volumes", pool = seg(pool));
        self.send("POST", &path, Some(spec)).await
    }

    /// Deletes a volume, snapshot or clone.
    pub async fn delete_volume(&self, pool: &str, name: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}",
            pool = seg(pool),
            name = seg(name)
        );
        self.send("DELETE", &path, None::<&()>).await
    }

    /// Deletes a volume, snapshot or clone that has clients (a vhost-user-blk export, NBD
    /// connections): they are ended first. Without clients, the same as
    /// [`Self::delete_volume`].
    pub async fn delete_volume_force(&self, pool: &str, name: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}?force=true",
            pool = seg(pool),
            name = seg(name)
        );
        self.send("DELETE", &path, None::<&()>).await
    }

    /// Grows a volume.
    pub async fn resize(&self, pool: &str, name: &str, size: u64) -> Result<VolumeInfo, Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}/resize",
            pool = seg(pool),
            name = seg(name)
        );
        self.send("POST", &path, Some(&ResizeSpec { size })).await
    }

    /// Sets a volume's I/O limits (0: unlimited).
    pub async fn set_qos(&self, pool: &str, name: &str, qos: QosSpec) -> Result<VolumeInfo, Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}/qos",
            pool = seg(pool),
            name = seg(name)
        );
        self.send("PUT", &path, Some(&qos)).await
    }

    /// Takes a snapshot of `source`.
    pub async fn snapshot(
        &self,
        pool: &str,
        source: &str,
        name: &str,
    ) -> Result<VolumeInfo, Error> {
        let spec = SnapshotSpec {
            source: source.into(),
            name: name.into(),
        };
        let path = format!("/v1/pools/{pool}/snapshots", pool = seg(pool));
        self.send("POST", &path, Some(&spec)).await
    }

    /// Clones a snapshot.
    pub async fn clone_snapshot(
        &self,
        pool: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<VolumeInfo, Error> {
        let spec = CloneSpec {
            snapshot: snapshot.into(),
            name: name.into(),
        };
        let path = format!("/v1/pools/{pool}/clones", pool = seg(pool));
        self.send("POST", &path, Some(&spec)).await
    }

    /// Reads `length` bytes at `offset` (at most [`MAX_TRANSFER`]).
    pub async fn read(
        &self,
        pool: &str,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}/data?offset={offset}&length={length}",
            pool = seg(pool),
            name = seg(name)
        );
        Ok(check(request(&self.socket, "GET", &path, None).await?)?.body)
    }

    /// Writes `data` at `offset` (durable after [`Self::flush`]).
    pub async fn write(
        &self,
        pool: &str,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}/data?offset={offset}",
            pool = seg(pool),
            name = seg(name)
        );
        check(request(&self.socket, "PUT", &path, Some(data)).await?)?;
        Ok(())
    }

    /// Zeroes `length` bytes at `offset` (whole 4 KiB blocks are released).
    pub async fn write_zeroes(
        &self,
        pool: &str,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<(), Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{name}/zero?offset={offset}&length={length}",
            pool = seg(pool),
            name = seg(name)
        );
        check(request(&self.socket, "POST", &path, None).await?)?;
        Ok(())
    }

    /// Where `to` differs from `from` (or, without, everything `to` maps).
    pub async fn diff(
        &self,
        pool: &str,
        to: &str,
        from: Option<&str>,
    ) -> Result<Vec<vblock_api::DiffRange>, Error> {
        let q = from.map(|f| format!("?from={f}")).unwrap_or_default();
        self.get(&format!(
            "/v1/pools/{pool}/volumes/{to}/diff{q}",
            pool = seg(pool),
            to = seg(to)
        ))
        .await
    }

    /// Exports a volume (a snapshot read-only) to VMs as vhost-user-blk.
    pub async fn export_vhost(
        &self,
        pool: &str,
        volume: &str,
        queues: usize,
    ) -> Result<VhostInfo, Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{volume}/vhost",
            pool = seg(pool),
            volume = seg(volume)
        );
        self.send("PUT", &path, Some(&VhostSpec { queues })).await
    }

    /// Stops a vhost-user export.
    pub async fn unexport_vhost(&self, pool: &str, volume: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/pools/{pool}/volumes/{volume}/vhost",
            pool = seg(pool),
            volume = seg(volume)
        );
        self.send("DELETE", &path, None::<&()>).await
    }

    /// Running vhost-user exports.
    pub async fn vhost_exports(&self) -> Result<Vec<VhostInfo>, Error> {
        self.get("/v1/vhost").await
    }

    /// The Prometheus text of every counter.
    pub async fn metrics(&self) -> Result<String, Error> {
        text(&self.socket, "/metrics").await
    }

    /// Copies `len` bytes of a raw image from `image` into volume `name` (created with the
    /// image's size rounded up to 512 if missing; an existing one must be large enough) and
    /// commits it. Runs of zero 4 KiB blocks are not sent: they stay unallocated (and are
    /// released in an existing volume). `progress` hears the bytes done after every chunk.
    pub async fn import(
        &self,
        pool: &str,
        name: &str,
        image: &mut (impl AsyncRead + Unpin),
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let size = len.div_ceil(512) * 512;
        let existed = match self.volume(pool, name).await {
            Ok(v) if v.size < size => {
                return Err(Error::Refused(format!(
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
                self.create_volume(pool, &spec).await?;
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
                .await
                .map_err(|source| Error::File {
                    what: format!("reading the image at {off}"),
                    source,
                })?;
            let padded = n.div_ceil(512) * 512;
            buf[n..padded].fill(0);
            self.write_thin(pool, name, off, &buf[..padded], existed)
                .await?;
            off += n as u64;
            progress(off);
        }
        self.flush(pool).await?;
        self.volume(pool, name).await
    }

    /// Writes `data` (a multiple of 512 bytes) at `offset` thinly: runs of all-zero 4 KiB
    /// blocks are not stored; where the volume may hold data already (`existed`), they are
    /// zeroed (released) instead of skipped.
    pub async fn write_thin(
        &self,
        pool: &str,
        name: &str,
        offset: u64,
        data: &[u8],
        existed: bool,
    ) -> Result<(), Error> {
        let len = data.len();
        let zero = |i: usize| data[i..(i + 4096).min(len)].iter().all(|b| *b == 0);
        let mut at = 0;
        while at < len {
            let start = at;
            let run_is_zero = zero(at);
            while at < len && zero(at) == run_is_zero {
                at += 4096;
            }
            let end = at.min(len);
            let to = offset + start as u64;
            if !run_is_zero {
                self.write(pool, name, to, &data[start..end]).await?;
            } else if existed {
                self.write_zeroes(pool, name, to, (end - start) as u64)
                    .await?;
            }
        }
        Ok(())
    }

    /// Copies volume (or snapshot) `name` whole into `image` as a raw image, leaving holes
    /// (seeking past them) where it reads zeros; `progress` hears the bytes done after every
    /// chunk. The caller sets the file's length and syncs it.
    pub async fn export(
        &self,
        pool: &str,
        name: &str,
        image: &mut (impl AsyncWrite + AsyncSeek + Unpin),
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let v = self.volume(pool, name).await?;
        let werr = |source| Error::File {
            what: "writing the image".into(),
            source,
        };
        let mut off = 0u64;
        while off < v.size {
            let n = (v.size - off).min(TRANSFER_CHUNK);
            let data = self.read(pool, name, off, n).await?;
            if data.len() as u64 != n {
                return Err(Error::Protocol(format!("short read at {off}")));
            }
            if data.iter().all(|b| *b == 0) {
                image
                    .seek(SeekFrom::Current(n as i64))
                    .await
                    .map_err(werr)?;
            } else {
                image.write_all(&data).await.map_err(werr)?;
            }
            off += n;
            progress(off);
        }
        image.flush().await.map_err(werr)?;
        Ok(v)
    }
}

blocking_client!("vblockd");

impl Client {
    blocking_methods! {
        /// All pools.
        fn pools(&self) -> Vec<PoolInfo>;
        /// One pool.
        fn pool(&self, name: &str) -> PoolInfo;
        /// Creates (with a size) or opens (without) a pool and serves it.
        fn create_pool(&self, spec: &PoolSpec) -> PoolInfo;
        /// Grows a pool online to `size` bytes (pools only grow).
        fn resize_pool(&self, name: &str, size: u64) -> PoolInfo;
        /// Sets a pool's space settings (live, kept).
        fn set_pool_space(&self, name: &str, space: &SpaceSpec) -> PoolInfo;
        /// Stops serving a pool (its file stays).
        fn remove_pool(&self, name: &str) -> ();
        /// Verifies a pool; with `repair`, reclaims leaked space.
        fn check(&self, pool: &str, repair: bool) -> CheckInfo;
        /// Makes everything written to a pool durable.
        fn flush(&self, pool: &str) -> ();
        /// A pool's volumes, snapshots and clones.
        fn volumes(&self, pool: &str) -> Vec<VolumeInfo>;
        /// One of them.
        fn volume(&self, pool: &str, name: &str) -> VolumeInfo;
        /// Creates a thin volume.
        fn create_volume(&self, pool: &str, spec: &VolumeSpec) -> VolumeInfo;
        /// Deletes a volume, snapshot or clone.
        fn delete_volume(&self, pool: &str, name: &str) -> ();
        /// Deletes one that has clients, ending them first.
        fn delete_volume_force(&self, pool: &str, name: &str) -> ();
        /// Grows a volume.
        fn resize(&self, pool: &str, name: &str, size: u64) -> VolumeInfo;
        /// Sets a volume's I/O limits (0: unlimited).
        fn set_qos(&self, pool: &str, name: &str, qos: QosSpec) -> VolumeInfo;
        /// Takes a snapshot of `source`.
        fn snapshot(&self, pool: &str, source: &str, name: &str) -> VolumeInfo;
        /// Clones a snapshot.
        fn clone_snapshot(&self, pool: &str, snapshot: &str, name: &str) -> VolumeInfo;
        /// Reads `length` bytes at `offset` (at most [`MAX_TRANSFER`]).
        fn read(&self, pool: &str, name: &str, offset: u64, length: u64) -> Vec<u8>;
        /// Writes `data` at `offset` (durable after [`Self::flush`]).
        fn write(&self, pool: &str, name: &str, offset: u64, data: &[u8]) -> ();
        /// Zeroes `length` bytes at `offset` (whole 4 KiB blocks are released).
        fn write_zeroes(&self, pool: &str, name: &str, offset: u64, length: u64) -> ();
        /// Writes `data` thinly (all-zero blocks not stored; zeroed where `existed`).
        fn write_thin(&self, pool: &str, name: &str, offset: u64, data: &[u8], existed: bool) -> ();
        /// Where `to` differs from `from` (or, without, everything `to` maps).
        fn diff(&self, pool: &str, to: &str, from: Option<&str>) -> Vec<vblock_api::DiffRange>;
        /// Exports a volume (a snapshot read-only) to VMs as vhost-user-blk.
        fn export_vhost(&self, pool: &str, volume: &str, queues: usize) -> VhostInfo;
        /// Stops a vhost-user export.
        fn unexport_vhost(&self, pool: &str, volume: &str) -> ();
        /// Running vhost-user exports.
        fn vhost_exports(&self) -> Vec<VhostInfo>;
        /// The Prometheus text of every counter.
        fn metrics(&self) -> String;
    }

    /// [`AsyncClient::import`] from a `std::io` reader.
    pub fn import(
        &self,
        pool: &str,
        name: &str,
        image: &mut (impl Read + Unpin),
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let mut image = SyncIo(image);
        crate::blocking::run(self.inner.import(pool, name, &mut image, len, progress))
    }

    /// [`AsyncClient::export`] into a `std::io` file.
    pub fn export(
        &self,
        pool: &str,
        name: &str,
        image: &mut (impl Write + Seek + Unpin),
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, Error> {
        let mut image = SyncIo(image);
        crate::blocking::run(self.inner.export(pool, name, &mut image, progress))
    }
}
