//! Errors of the HTTP client layer. Owns the classification of a failed request into the
//! error classes the metrics report (spec §4: connect, timeout, TLS, ...). It must not
//! decide anything about HTTP status codes: a 4xx/5xx response is a `Response`, not an error.

use std::fmt;

use stampede_protocol::snapshot::ErrorClass;

/// What went wrong, coarse enough to be a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpErrorKind {
    /// The URL or a header could not be turned into a request (bad input, not the target's fault).
    InvalidRequest,
    /// The host name could not be resolved.
    Dns,
    /// No TCP connection could be established (refused, unreachable, connect timeout).
    Connect,
    /// The TLS handshake failed (certificate, protocol, ALPN).
    Tls,
    /// The request did not complete within its timeout.
    Timeout,
    /// The connection broke while the request was in flight (reset, closed early).
    Io,
    /// The server answered something that is not valid HTTP, or a redirect was malformed.
    Protocol,
    /// The target is not on this node's allowlist; nothing was sent to it.
    Refused,
}

impl HttpErrorKind {
    /// Stable lower-case name, usable as a metric tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpErrorKind::InvalidRequest => "invalid_request",
            HttpErrorKind::Dns => "dns",
            HttpErrorKind::Connect => "connect",
            HttpErrorKind::Tls => "tls",
            HttpErrorKind::Timeout => "timeout",
            HttpErrorKind::Io => "io",
            HttpErrorKind::Protocol => "protocol",
            HttpErrorKind::Refused => "refused",
        }
    }

    /// The error class of spec §4 this kind is reported under. DNS failures are part of
    /// establishing a connection, and a connection that breaks mid-request is a transport
    /// failure too, so both fold into `connect`.
    pub fn spec_class(self) -> &'static str {
        match self {
            HttpErrorKind::Dns | HttpErrorKind::Connect | HttpErrorKind::Io => "connect",
            HttpErrorKind::Tls => "tls",
            HttpErrorKind::Timeout => "timeout",
            HttpErrorKind::Protocol => "protocol",
            HttpErrorKind::Refused => "refused",
            HttpErrorKind::InvalidRequest => "invalid_request",
        }
    }

    /// The error class a step's failure of this kind is counted under in the metrics
    /// (HTTP, gRPC and WebSocket steps alike).
    pub fn class(self) -> ErrorClass {
        match self {
            HttpErrorKind::Dns => ErrorClass::Dns,
            HttpErrorKind::Connect | HttpErrorKind::Io => ErrorClass::Connect,
            HttpErrorKind::Tls => ErrorClass::Tls,
            HttpErrorKind::Timeout => ErrorClass::Timeout,
            HttpErrorKind::Refused => ErrorClass::Refused,
            HttpErrorKind::InvalidRequest | HttpErrorKind::Protocol => ErrorClass::Other,
        }
    }
}

impl fmt::Display for HttpErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request: a kind for metrics and a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    kind: HttpErrorKind,
    message: String,
    /// For a target that could not be reached at all: where and what, with a hint, the
    /// same for every request that fails this way (`127.0.0.1:9: connection refused —
    /// is the service up?`), so it can be said once rather than per request.
    diagnosis: Option<Box<str>>,
}

impl HttpError {
    pub fn new(kind: HttpErrorKind, message: impl Into<String>) -> Self {
        HttpError {
            kind,
            message: message.into(),
            diagnosis: None,
        }
    }

    /// Adds the one-line diagnosis (see the field).
    pub fn with_diagnosis(mut self, line: impl Into<Box<str>>) -> Self {
        self.diagnosis = Some(line.into());
        self
    }

    pub fn diagnosis(&self) -> Option<&str> {
        self.diagnosis.as_deref()
    }

    pub fn kind(&self) -> HttpErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.message)
    }
}

impl std::error::Error for HttpError {}

/// An error and its sources as one sentence, so the message names the real cause
/// (hyper's own text is often just "error trying to connect").
pub(crate) fn root_cause_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = e.source();
    }
    text
}
