//! The HTTP client layer of the load engine: connections owned per VU (our own HTTP/1.1
//! framing, HTTP/2 through the `h2` crate, both driven on the VU's task), with
//! node-wide DNS cache, TLS config and target allowlist.
//!
//! Shape (thread-per-core, like wrk): the engine runs one current-thread tokio runtime per
//! worker thread; each VU is a task pinned to one worker and owns a [`VuClient`] and a
//! [`CookieJar`]. The request path therefore takes no lock and sends on no channel of
//! ours; [`Shared`] (behind an `Arc`) is consulted only when a connection is opened.
//! This layer measures (timestamps and byte counts on [`Response`]) but records nothing:
//! histograms belong to the engine's per-worker metrics. It never sends traffic to a
//! target the node's [`Allowlist`] does not allow, and checks that on every new
//! connection, redirects included.

mod allow;
mod client;
mod cookies;
mod dns;
mod error;
mod grpc;
mod h1;
mod headers;
mod hpack;
mod http2;
mod tls;
mod url;
pub mod ws;

pub use allow::{Allowlist, AllowlistError, LOOPBACK};
pub use client::{
    ClientSettings, Diagnosis, HttpVersionPref, OutRequest, Response, Shared, VuClient,
};
pub use cookies::{Cookie, CookieJar};
pub use error::{HttpError, HttpErrorKind};
pub use grpc::{GrpcClient, GrpcMethod, GrpcReply};
pub use headers::ResponseHeaders;
pub use url::{Scheme, Url};
