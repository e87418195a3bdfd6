//! The domain error every manager operation returns: a kind (what went wrong, for the HTTP layer
//! to map to a status), a stable code scripts can match, and a one-line message.

/// What kind of failure an operation met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (bad name, size, option …); nothing changed.
    BadRequest,
    /// Missing or wrong credentials.
    Unauthorized,
    NotFound,
    /// The request conflicts with the current state (attached, in use, last copy …).
    Conflict,
    /// A backend the manager relies on (a backup target) failed.
    Upstream,
    /// A fault inside the manager (its store).
    Internal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    /// Stable, CamelCase (`LastGoodReplica`, `TargetUnavailable` …).
    pub code: &'static str,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Error {
        Error {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn bad(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::BadRequest, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, code, message)
    }

    /// `"{kind} {name:?} not found"`, code `NotFound`.
    pub fn not_found(what: &str, name: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            "NotFound",
            format!("{what} {name:?} not found"),
        )
    }
}

/// The `message` of an error body (`{"code","message"}`), or the body itself when it is not one.
pub fn body_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.to_string())
}
