//! NBD over TLS (NBD_OPT_STARTTLS): the server's X.509 configuration, and the TLS side of a
//! connection. After the handshake, a thread of the connection moves bytes between the
//! client's socket (TLS records) and one end of a socket pair (plaintext); the rest of the
//! server runs on the other end exactly as on a plain connection.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::server::Conn;
use crate::Error;

/// Decrypted bytes held for the server before the client's socket is read again.
const PLAINTEXT_BACKLOG: usize = 1 << 20;

/// A TLS server configuration from PEM files: the server's certificate chain and key and,
/// when `client_ca` is given, the CA(s) whose certificates clients must present.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, Error> {
    let pem_err = |what: &str, p: &Path, e: rustls::pki_types::pem::Error| {
        Error::Invalid(format!("TLS {what} {}: {e}", p.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err("certificate", cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("certificate", cert, e))?;
    if chain.is_empty() {
        return Err(Error::Invalid(format!(
            "TLS certificate {}: no certificate in it",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("key", key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err("CA", ca, e))? {
                roots
                    .add(c.map_err(|e| pem_err("CA", ca, e))?)
                    .map_err(|e| Error::Invalid(format!("TLS CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Invalid(format!("TLS CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| Error::Invalid(format!("TLS certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the TLS handshake on `stream` (done by `deadline` or failed), then gives the
/// plaintext side of the session; a thread of its own carries the bytes until either side
/// ends.
pub(super) fn terminate<S: Conn>(
    mut stream: S,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> io::Result<UnixStream> {
    let mut tls = ServerConnection::new(config).map_err(tls_error)?;
    while tls.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake took too long",
            ));
        }
        stream.set_timeouts(Some(left))?;
        if let Err(e) = tls.complete_io(&mut stream) {
            // Tell the client why (an alert) where it can still hear it.
            let _ = tls.write_tls(&mut stream);
            return Err(e);
        }
    }
    // After the handshake, the socket pair gives the back pressure: the sending side only
    // takes plaintext when the last records left.
    tls.set_buffer_limit(None);
    let (plain, inner) = UnixStream::pair()?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            if let Err(e) = carry(stream, tls, inner) {
                tracing::debug!(error = %e, "NBD TLS session ended");
            }
        })?;
    Ok(plain)
}

/// Moves bytes between the client (TLS records on `net`) and the server (`plain`) until
/// both directions ended, or either side failed.
fn carry<S: Conn>(mut net: S, mut tls: ServerConnection, mut plain: UnixStream) -> io::Result<()> {
    net.set_timeouts(None)?;
    net.set_nonblocking(true)?;
    plain.set_nonblocking(true)?;
    let mut to_server: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let (mut client_done, mut server_done) = (false, false);
    let mut told_server = false;
    loop {
        // Plaintext rustls holds (the handshake's last read may have brought some).
        while !client_done && to_server.len() < PLAINTEXT_BACKLOG {
            match tls.reader().read(&mut buf) {
                Ok(0) => client_done = true, // close_notify
                Ok(n) => to_server.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Decrypted bytes to the server, as far as it takes them.
        while !to_server.is_empty() {
            match plain.write(&to_server) {
                Ok(n) => {
                    to_server.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if client_done && to_server.is_empty() && !told_server {
            let _ = plain.shutdown(std::net::Shutdown::Write);
            told_server = true;
        }
        // Records to the client.
        while tls.wants_write() {
            match tls.write_tls(&mut net) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if server_done && !tls.wants_write() {
            Conn::close(&net);
            return Ok(());
        }
        if client_done && told_server && server_done {
            return Ok(());
        }
        let mut net_interest = PollFlags::empty();
        if !client_done && to_server.len() < PLAINTEXT_BACKLOG {
            net_interest |= PollFlags::POLLIN;
        }
        if tls.wants_write() {
            net_interest |= PollFlags::POLLOUT;
        }
        let mut plain_interest = PollFlags::empty();
        if !server_done && !tls.wants_write() {
            plain_interest |= PollFlags::POLLIN;
        }
        if !to_server.is_empty() {
            plain_interest |= PollFlags::POLLOUT;
        }
        let (net_ev, plain_ev) = {
            let mut fds = [
                PollFd::new(net.as_fd(), net_interest),
                PollFd::new(plain.as_fd(), plain_interest),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            (
                fds[0].revents().unwrap_or(PollFlags::empty()),
                fds[1].revents().unwrap_or(PollFlags::empty()),
            )
        };
        let gone = PollFlags::POLLERR | PollFlags::POLLHUP;
        if net_ev.intersects(gone) && !net_ev.contains(PollFlags::POLLIN) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "client went away",
            ));
        }
        if plain_ev.intersects(gone) && !plain_ev.contains(PollFlags::POLLIN) {
            return Ok(()); // the server closed the connection
        }
        if net_ev.contains(PollFlags::POLLIN) {
            match tls.read_tls(&mut net) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let _ = tls.write_tls(&mut net);
                        return Err(tls_error(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if plain_ev.contains(PollFlags::POLLIN) {
            match plain.read(&mut buf) {
                Ok(0) => {
                    server_done = true;
                    tls.send_close_notify();
                }
                Ok(n) => tls.writer().write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
