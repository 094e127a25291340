//! A minimal blocking HTTP/1.1 client over a unix socket: one request per connection
//! (`Connection: close`), `Content-Length` and chunked responses.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::Error;

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Sends one request and reads the whole response.
pub fn request(
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
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        socket: name.clone(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let body = body.unwrap_or(&[]);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(io)?;
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
            reader.read_line(&mut line).map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Error::Protocol(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let start = out.len();
            out.resize(start + size, 0);
            reader.read_exact(&mut out[start..]).map_err(io)?;
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        reader.read_exact(&mut out).map_err(io)?;
    } else {
        reader.read_to_end(&mut out).map_err(io)?;
    }
    Ok(Response { status, body: out })
}

/// The error envelope every libvirtual daemon answers with.
#[derive(serde::Deserialize)]
struct Envelope {
    error: EnvelopeBody,
}

#[derive(serde::Deserialize)]
struct EnvelopeBody {
    code: String,
    message: String,
}

/// Turns a non-2xx response into [`Error::Api`] (with the daemon's code and message).
pub fn check(resp: Response) -> Result<Response, Error> {
    if (200..300).contains(&resp.status) {
        return Ok(resp);
    }
    Err(match serde_json::from_slice::<Envelope>(&resp.body) {
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
    })
}

/// One JSON request: the body serialised, the answer (an empty one is `null`) parsed.
pub fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&impl serde::Serialize>,
) -> Result<T, Error> {
    let bytes = match body {
        Some(b) => Some(serde_json::to_vec(b).map_err(|e| Error::Protocol(e.to_string()))?),
        None => None,
    };
    let resp = check(request(socket, method, path, bytes.as_deref())?)?;
    let body = if resp.body.is_empty() {
        b"null".to_vec()
    } else {
        resp.body
    };
    serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("{method} {path}: {e}")))
}

/// A text answer (`/metrics`).
pub fn text(socket: &Path, path: &str) -> Result<String, Error> {
    let resp = check(request(socket, "GET", path, None)?)?;
    String::from_utf8(resp.body).map_err(|e| Error::Protocol(e.to_string()))
}
