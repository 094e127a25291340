//! What the blocking clients are made of: one small tokio runtime per process that runs the
//! async clients' requests to completion on the calling thread, and adapters that let
//! `std::io` files stand where the async clients take tokio's I/O traits.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Runtime;

use crate::Error;

/// Runs `request` to completion on the calling thread. Fails (instead of panicking) when
/// called from inside an async runtime, where the async clients belong.
pub(crate) fn run<T>(request: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Protocol(
            "a blocking client was called inside an async runtime: use the Async clients there"
                .into(),
        ));
    }
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => rt.block_on(request),
        Err(e) => Err(Error::Protocol(format!(
            "cannot start the client's runtime: {e}"
        ))),
    }
}

/// Blocking client methods that run the async client's method of the same name.
macro_rules! blocking_methods {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)* $(,)?) -> $ret:ty; )*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self $(, $arg: $ty)*) -> Result<$ret, crate::Error> {
                crate::blocking::run(self.inner.$name($($arg),*))
            }
        )*
    };
}
pub(crate) use blocking_methods;

/// The blocking `Client` of a client module: its `AsyncClient` run to completion on the
/// calling thread.
macro_rules! blocking_client {
    ($daemon:literal) => {
        #[doc = concat!(
            "A blocking client of one ", $daemon, ": [`AsyncClient`] run to completion on the ",
            "calling thread. Not for use inside an async runtime (it says so with an error there)."
        )]
        #[derive(Clone, Debug)]
        pub struct Client {
            inner: AsyncClient,
        }

        impl Client {
            /// A client of the daemon listening on `socket`.
            pub fn new(socket: impl AsRef<std::path::Path>) -> Client {
                Client {
                    inner: AsyncClient::new(socket),
                }
            }

            /// The async client it wraps.
            pub fn as_async(&self) -> &AsyncClient {
                &self.inner
            }
        }
    };
}
pub(crate) use blocking_client;

#[cfg(feature = "block")]
pub(crate) use sync_io::SyncIo;

#[cfg(feature = "block")]
mod sync_io {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

    /// A `std::io` file (or any reader, writer, seeker) as the tokio I/O traits: each call does
    /// the blocking operation at once (the blocking clients' runtime runs on the caller's thread).
    pub(crate) struct SyncIo<T>(pub T);

    impl<T: Read + Unpin> AsyncRead for SyncIo<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.0.read(buf.initialize_unfilled())?;
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    impl<T: Write + Unpin> AsyncWrite for SyncIo<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(self.0.write(buf))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(self.0.flush())
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    /// Seeks happen in `start_seek`; `poll_complete` reports the position.
    impl<T: Seek + Unpin> AsyncSeek for SyncIo<T> {
        fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
            self.0.seek(position).map(|_| ())
        }

        fn poll_complete(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<std::io::Result<u64>> {
            Poll::Ready(self.0.stream_position())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(feature = "net", feature = "block"))]
    fn a_blocking_call_inside_a_runtime_is_an_error_not_a_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(async { crate::net::Client::new("/nonexistent.sock").tenants() })
            .unwrap_err();
        assert!(err.to_string().contains("inside an async runtime"), "{err}");
        // Outside one it runs (and finds nobody there).
        let err = crate::block::Client::new("/nonexistent.sock")
            .pools()
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }

    #[test]
    #[cfg(feature = "block")]
    fn sync_io_stands_for_tokio_io() {
        use std::io::SeekFrom;
        let file = std::io::Cursor::new(Vec::new());
        let mut io = SyncIo(file);
        run(async {
            use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
            io.write_all(b"hello").await.unwrap();
            io.seek(SeekFrom::Current(3)).await.unwrap();
            io.write_all(b"!").await.unwrap();
            io.seek(SeekFrom::Start(0)).await.unwrap();
            let mut back = Vec::new();
            io.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"hello\0\0\0!");
            Ok(())
        })
        .unwrap();
    }
}
