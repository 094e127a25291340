//! The daemons' side: structured logs, the control API served over HTTP/1.1 on a unix socket
//! with clean shutdown, persisted state, API errors as responses.

use std::path::Path;

use anyhow::{Context, bail};
use tracing::{error, info};

use crate::ApiError;

/// Sets up `tracing` logs: human-readable, or JSON lines with `json`; the level comes from
/// `RUST_LOG` (default `info`).
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs redirected to a file or a journal stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .init();
    }
}

/// Runs a daemon's or tool's `main` body: an error ends the process with exit status 1
/// after one line naming the program and the error's chain of causes (never a backtrace:
/// a startup error is a message for the user, whatever `RUST_BACKTRACE` says).
pub fn run_main(
    program: &str,
    body: impl FnOnce() -> anyhow::Result<()>,
) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses a `--log-format` value: `human` or `json`; returns true for JSON.
pub fn json_logs(format: &str) -> anyhow::Result<bool> {
    match format {
        "human" => Ok(false),
        "json" => Ok(true),
        other => bail!("log format {other:?}: use human or json"),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    info!("shutting down");
}

/// Serves `router` on the unix socket `socket` (owner, group and mode as installed with
/// [`crate::SocketAccess::install`]; default 0600) until SIGINT/SIGTERM, then removes
/// the socket. A socket left by a crashed instance is replaced; one a live instance answers
/// on is not (`daemon` names the daemon in that error).
/// At most `max_connections` connections are served at once (0: [`MAX_API_CONNECTIONS`]).
pub async fn serve(
    socket: &Path,
    router: axum::Router,
    daemon: &str,
    max_connections: usize,
) -> anyhow::Result<()> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("another {daemon} serves {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    crate::SocketAccess::current()
        .apply(socket)
        .with_context(|| format!("socket access of {}", socket.display()))?;
    info!(socket = %socket.display(), "{daemon} ready");
    let listener = Bounded {
        inner: listener,
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(if max_connections == 0 {
            MAX_API_CONNECTIONS
        } else {
            max_connections
        })),
    };
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    let _ = std::fs::remove_file(socket);
    if let Err(e) = served {
        error!(error = %e, "API server failed");
        return Err(e.into());
    }
    Ok(())
}

/// Most API connections a daemon serves at once by default (`--api-max-connections`);
/// further clients wait in the socket's backlog until one ends (a client that opens
/// connections and sends nothing cannot take every file descriptor or thread).
pub const MAX_API_CONNECTIONS: usize = 64;

/// An API connection on which nothing happens for this long is closed (an idle keep-alive
/// connection).
pub const API_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A new API connection that sends nothing for this long is closed.
pub const API_FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The API socket with a bound on open connections; accept errors
/// (EMFILE) are retried after a pause by axum, never in a spin.
struct Bounded {
    inner: tokio::net::UnixListener,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Guarded, Self::Addr) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            // The semaphore is never closed; should it be, serve without a bound.
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            return (Guarded::new(io, None), addr);
        };
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Guarded::new(io, Some(slot)), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An API connection: holds its slot until it ends, and ends after
/// [`API_FIRST_REQUEST_TIMEOUT`] without a first byte, [`API_IDLE_TIMEOUT`] without reads or
/// writes later.
struct Guarded {
    io: tokio::net::UnixStream,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    fn new(io: tokio::net::UnixStream, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        Guarded {
            io,
            _slot: slot,
            idle: Box::pin(tokio::time::sleep(API_FIRST_REQUEST_TIMEOUT)),
        }
    }

    fn active(&mut self) {
        let next = tokio::time::Instant::now() + API_IDLE_TIMEOUT;
        self.idle.as_mut().reset(next);
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "API connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A multi-threaded tokio runtime for the control API (two workers: the API is not a
/// datapath).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, fsync
/// of the directory. After a crash the file is either the old or the new content.
pub fn save_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a daemon's persisted JSON state from `path`; a missing file is the default state.
pub fn load_state<T: serde::de::DeserializeOwned + Default>(path: &Path) -> std::io::Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e),
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        match &self {
            ApiError::Internal(m) => error!(error = %m, "API request failed"),
            other => tracing::debug!(
                code = other.code(),
                error = other.message(),
                "API request refused"
            ),
        }
        let status = axum::http::StatusCode::from_u16(self.status())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.envelope())).into_response()
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::Invalid(r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::Invalid(r.body_text())
    }
}

/// Runs blocking control work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_are_atomic_replacements() {
        let dir = std::env::temp_dir().join(format!("daemon-kit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        save_atomic(&p, b"one").unwrap();
        save_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Calls `retry` on the daemon state behind `state` every `every`, from a thread of its
/// own, until the state is dropped: how both daemons try again what they could not
/// restore at start (a namespace or a file system that comes back later).
pub fn spawn_retries<T: Send + 'static>(
    name: &str,
    every: std::time::Duration,
    state: std::sync::Weak<std::sync::Mutex<T>>,
    mut retry: impl FnMut(&mut T) + Send + 'static,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(state) = state.upgrade() else {
                    return;
                };
                retry(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
            }
        })
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}

/// The flags every daemon takes (flatten into its own `clap` arguments).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML config file (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Directory of the control socket and vhost-user sockets [default: $LIBVIRTUAL_RUN_DIR,
    /// else /run/libvirtual as root and $XDG_RUNTIME_DIR/libvirtual otherwise].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<std::path::PathBuf>,
    /// Directory of the persisted state [default: $LIBVIRTUAL_STATE_DIR, else
    /// /var/lib/libvirtual].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Log format [default: human].
    #[arg(long, value_parser = ["human", "json"])]
    pub log_format: Option<String>,
    /// Owner (user name or uid) of every socket the daemon creates: API, vhost-user, NBD
    /// [default: the daemon's user].
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,
    /// Group (name or gid) of every socket the daemon creates, e.g. `kvm` for QEMU or
    /// cloud-hypervisor running unprivileged [default: the daemon's group].
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Permission bits of every socket the daemon creates, in octal: 0600 (only the owner),
    /// 0660 (and the group), 0666 [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// API connections served at once; more wait in the socket's backlog [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub api_max_connections: Option<u32>,
}

impl CommonArgs {
    /// The sockets' access: flags over the config file's `socket_owner`, `socket_group`,
    /// `socket_mode`.
    pub fn socket_access(
        &self,
        owner: Option<String>,
        group: Option<String>,
        mode: Option<String>,
    ) -> anyhow::Result<crate::SocketAccess> {
        crate::SocketAccess::parse(
            self.socket_owner.clone().or(owner).as_deref(),
            self.socket_group.clone().or(group).as_deref(),
            self.socket_mode.clone().or(mode).as_deref(),
        )
        .map_err(|e| anyhow::anyhow!(e))
    }
}

/// The effective common settings: flags over the config file over defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Common {
    /// Directory of the control socket.
    pub run_dir: std::path::PathBuf,
    /// Directory of the persisted state.
    pub state_dir: std::path::PathBuf,
    /// Log as JSON lines.
    pub json_logs: bool,
}

impl CommonArgs {
    /// Resolves the flags against the config file's `run_dir`, `state_dir` and `log_format`.
    pub fn resolve(
        &self,
        run_dir: Option<std::path::PathBuf>,
        state_dir: Option<std::path::PathBuf>,
        log_format: Option<String>,
    ) -> anyhow::Result<Common> {
        let format = self
            .log_format
            .clone()
            .or(log_format)
            .unwrap_or_else(|| "human".into());
        Ok(Common {
            run_dir: self
                .run_dir
                .clone()
                .or(run_dir)
                .unwrap_or_else(crate::default_run_dir),
            state_dir: self
                .state_dir
                .clone()
                .or(state_dir)
                .unwrap_or_else(crate::default_state_dir),
            json_logs: json_logs(&format)?,
        })
    }
}

/// A JSON request body, parsed whatever its `content-type` says (`curl -d` sends
/// `application/x-www-form-urlencoded` unless told otherwise, and the API takes only JSON).
/// A body that is not the JSON expected is refused as `invalid` (400) with serde's reason.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Invalid(format!("request body: {}", e.body_text())))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::Invalid(format!("request body is not the JSON expected: {e}")))
    }
}
