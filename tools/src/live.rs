//! The shop's WebSocket endpoint `GET /ws/orders`: live order updates. A client sends
//! `{"type":"track","order":N}` and gets two updates for that order (`packed`, then
//! `shipped`); any other message, text or binary, is echoed back as it came.
//!
//! Messages in and out are counted in the target's stats (`/_stats`), the upgrade as a
//! request of the endpoint. Messages are bounded ([`MAX_MESSAGE`]); this module only
//! speaks WebSocket, routing and counting requests stay in `service`.

use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::service::Shared;

/// Largest message (and frame) the endpoint accepts: 64 KiB, like a request body.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The subprotocol the endpoint speaks when a client asks for it.
pub const SUBPROTOCOL: &str = "orders.v1";

/// Answers the upgrade request and serves the socket on its own task; a request that
/// is not a WebSocket upgrade gets 400.
pub(crate) fn upgrade(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"{\"error\":\"expected a WebSocket upgrade\"}",
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let wants_proto = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve(&shared, ws).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if wants_proto {
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    r
}

async fn serve<S>(shared: &Shared, mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let stats = &shared.stats;
    stats.ws_session_opened();
    let _closed = crate::service::OnDrop(|| stats.ws_session_closed());
    while let Some(Ok(msg)) = ws.next().await {
        let replies = match msg {
            Message::Text(t) => {
                stats.ws_received();
                match track_order(t.as_str()) {
                    Some(order) => ["packed", "shipped"]
                        .map(|status| {
                            Message::text(format!(
                                "{{\"type\":\"status\",\"order\":{order},\"status\":\"{status}\"}}"
                            ))
                        })
                        .to_vec(),
                    None => vec![Message::Text(t)],
                }
            }
            Message::Binary(b) => {
                stats.ws_received();
                vec![Message::Binary(b)]
            }
            Message::Close(_) => break,
            // Pings are answered by tungstenite; pongs need nothing.
            _ => continue,
        };
        for m in replies {
            if ws.feed(m).await.is_err() {
                return;
            }
            stats.ws_sent();
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
    // Finishes the closing handshake when the client started it.
    let _ = ws.close(None).await;
}

/// The order of a `{"type":"track","order":N}` message.
fn track_order(text: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "track" {
        return None;
    }
    v.get("order")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_messages_are_recognised() {
        assert_eq!(track_order(r#"{"type":"track","order":42}"#), Some(42));
        assert_eq!(track_order(r#"{"type":"chat","order":42}"#), None);
        assert_eq!(track_order("hello"), None);
    }
}
