//! A minimal async HTTP/1.1 client over a unix socket: one request per connection
//! (`Connection: close`), `Content-Length` and chunked responses, a 60 s limit per request.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::Error;

/// How long one request may take, connection to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Sends one request and reads the whole response.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let name = socket.display().to_string();
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(socket, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Io {
            socket: name,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{method} {path}: no answer in {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            ),
        }),
    }
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let name = socket.display().to_string();
    let io = |source| Error::Io {
        socket: name.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            socket: name.clone(),
            source,
        })?;
    let body = body.unwrap_or(&[]);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.map_err(io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).await.map_err(io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).await.map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Error::Protocol(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let start = out.len();
            out.resize(start + size, 0);
            reader.read_exact(&mut out[start..]).await.map_err(io)?;
            line.clear();
            reader.read_line(&mut line).await.map_err(io)?;
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        reader.read_exact(&mut out).await.map_err(io)?;
    } else {
        reader.read_to_end(&mut out).await.map_err(io)?;
    }
    Ok(Response { status, body: out })
}

/// Turns a non-2xx response into [`Error::Api`] (with the daemon's code and message).
pub fn check(resp: Response) -> Result<Response, Error> {
    if (200..300).contains(&resp.status) {
        return Ok(resp);
    }
    Err(
        match serde_json::from_slice::<daemon_kit::ErrorResponse>(&resp.body) {
            Ok(e) => Error::Api {
                status: resp.status,
                code: e.error.code,
                message: e.error.message,
            },
            Err(_) => Error::Api {
                status: resp.status,
                code: "unknown".into(),
                message: String::from_utf8_lossy(&resp.body).into_owned(),
            },
        },
    )
}

/// One JSON request: the body serialised, the answer (an empty one is `null`) parsed.
pub async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&(impl serde::Serialize + ?Sized)>,
) -> Result<T, Error> {
    let bytes = match body {
        Some(b) => Some(serde_json::to_vec(b).map_err(|e| Error::Protocol(e.to_string()))?),
        None => None,
    };
    let resp = check(request(socket, method, path, bytes.as_deref()).await?)?;
    let body = if resp.body.is_empty() {
        b"null".to_vec()
    } else {
        resp.body
    };
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("{method} {path}: {e}")))
}

/// A text answer (`/metrics`).
pub async fn text(socket: &Path, path: &str) -> Result<String, Error> {
    let resp = check(request(socket, "GET", path, None).await?)?;
    String::from_utf8(resp.body).map_err(|e| Error::Protocol(e.to_string()))
}

/// One URL path segment, percent-encoded (names are checked by the daemons; this keeps a
/// bad one from changing the path: `x?y#z` stays one segment and gets a clear refusal).
pub(crate) fn seg(value: impl std::fmt::Display) -> String {
    daemon_kit::names::encode_path_segment(&value.to_string())
}
