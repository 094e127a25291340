//! The one error envelope of libvirtual's daemon APIs: every failed request answers
//! `{"error":{"code":"…","message":"…"}}` with the HTTP status its code implies. The daemons
//! produce it from [`ApiError`] (with the `server` feature it is an axum response), the
//! clients read it back into [`ErrorResponse`]. Also the one list both daemons keep of what
//! they could not restore ([`Unrestored`]).

use serde::{Deserialize, Serialize};

/// An API error: a stable code (by variant) and a human message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// The named object does not exist (404, `not_found`).
    NotFound(String),
    /// It exists already, or is in use, or is read-only (409, `conflict`).
    Conflict(String),
    /// The request is wrong (400, `invalid`).
    Invalid(String),
    /// No space left (507, `no_space`).
    NoSpace(String),
    /// Something failed on our side (500, `internal`).
    Internal(String),
    /// A service it needs does not answer now, try again later (503, `unavailable`): etcd,
    /// for a vswitchd in a cluster.
    Unavailable(String),
}

impl ApiError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Invalid(_) => "invalid",
            ApiError::NoSpace(_) => "no_space",
            ApiError::Internal(_) => "internal",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Invalid(m)
            | ApiError::NoSpace(m)
            | ApiError::Internal(m)
            | ApiError::Unavailable(m) => m,
        }
    }

    /// The HTTP status the error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Invalid(_) => 400,
            ApiError::NoSpace(_) => 507,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }

    /// The response body.
    pub fn envelope(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                code: self.code().to_owned(),
                message: self.message().to_owned(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// An error as sent: a stable code and a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `not_found`, `conflict`, `invalid`, `no_space`, `internal`, `unavailable` (clients
    /// keep codes they do not know as they are).
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// A saved object a daemon could not restore at start (`GET /v1/unrestored`): kept in its
/// state and retried every few seconds; deleting the object forgets it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unrestored {
    /// What it is (vswitchd: `tenant`, `port`, `vtep`, `fdb`; vblockd: `pool`, `vhost`).
    pub kind: String,
    /// Its name (a VTEP or forwarding entry `TENANT/IP`, `TENANT/MAC`; an export
    /// `POOL/VOLUME`).
    pub name: String,
    /// Why it could not be restored (the last try).
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_round_trips_with_escapes() {
        let e = ApiError::NoSpace("pool \"p\" is full\n".into());
        assert_eq!((e.code(), e.status()), ("no_space", 507));
        let json = serde_json::to_string(&e.envelope()).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"no_space","message":"pool \"p\" is full\n"}}"#
        );
        let back: ErrorResponse = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e.envelope());
    }
}
