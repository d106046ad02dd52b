//! The shop's gRPC face: the `shop.Inventory` service of `examples/proto/inventory.proto`
//! (GetStock unary, WatchStock server-streaming, TotalStock client-streaming, StockFeed
//! bidirectional), served over h2c on the target's HTTP port; a streaming call's request
//! messages are read whole before it is answered. Calls are counted in `/_stats` like the HTTP endpoints (one request per call,
//! answered 200 at the HTTP level; the gRPC status travels in the trailers).
//! It owns the gRPC framing of the target and the response body type that can carry
//! trailers; the business rules stay in `shop`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use prost::Message;

use crate::service::{Shared, MAX_BODY};
use crate::shop::PRODUCTS;
use crate::stats::Endpoint;

/// Most stock levels one WatchStock call streams.
pub const MAX_UPDATES: u32 = 100;
/// Most request messages one streaming call may send.
pub const MAX_STREAMED: usize = 1000;

/// The body of every answer of the target: a whole body (HTTP), or frames with trailers
/// (gRPC).
pub(crate) enum ShopBody {
    Full(Full<Bytes>),
    Frames(VecDeque<Frame<Bytes>>),
}

impl hyper::body::Body for ShopBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ShopBody::Full(f) => Pin::new(f).poll_frame(cx),
            ShopBody::Frames(q) => Poll::Ready(q.pop_front().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ShopBody::Full(f) => f.is_end_stream(),
            ShopBody::Frames(q) => q.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ShopBody::Full(f) => f.size_hint(),
            ShopBody::Frames(_) => SizeHint::default(),
        }
    }
}

#[derive(Clone, PartialEq, Message)]
struct StockRequest {
    #[prost(uint64, tag = "1")]
    product_id: u64,
}

#[derive(Clone, PartialEq, Message)]
struct WatchRequest {
    #[prost(uint64, tag = "1")]
    product_id: u64,
    #[prost(uint32, tag = "2")]
    updates: u32,
}

#[derive(Clone, PartialEq, Message)]
struct StockTotal {
    #[prost(uint32, tag = "1")]
    products: u32,
    #[prost(uint64, tag = "2")]
    quantity: u64,
}

#[derive(Clone, PartialEq, Message)]
struct Stock {
    #[prost(uint64, tag = "1")]
    product_id: u64,
    #[prost(uint32, tag = "2")]
    quantity: u32,
    #[prost(string, tag = "3")]
    warehouse: String,
}

/// Whether a request is a gRPC call (by its content type).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Answers one gRPC call.
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<ShopBody> {
    let endpoint = match req.uri().path() {
        "/shop.Inventory/GetStock" => Some(Endpoint::GrpcGetStock),
        "/shop.Inventory/WatchStock" => Some(Endpoint::GrpcWatchStock),
        "/shop.Inventory/TotalStock" => Some(Endpoint::GrpcTotalStock),
        "/shop.Inventory/StockFeed" => Some(Endpoint::GrpcStockFeed),
        _ => None,
    };
    shared.stats.received(endpoint.unwrap_or(Endpoint::Other));
    let resp = match endpoint {
        None => status_only(12, "unknown method"),
        Some(e) => match read_messages(req).await {
            Err(why) => status_only(13, why),
            Ok(msgs) => match e {
                Endpoint::GrpcTotalStock => total_stock(msgs),
                Endpoint::GrpcStockFeed => stock_feed(msgs),
                _ if msgs.len() != 1 => status_only(13, "not one uncompressed gRPC message"),
                Endpoint::GrpcGetStock => get_stock(msgs[0].clone()),
                _ => watch_stock(msgs[0].clone()),
            },
        },
    };
    shared.stats.responded(200);
    resp
}

fn get_stock(msg: Bytes) -> Response<ShopBody> {
    let Ok(req) = StockRequest::decode(msg) else {
        return status_only(3, "not a StockRequest");
    };
    match stock(req.product_id, 0) {
        None => status_only(5, "no such product"),
        Some(s) => answer(vec![s]),
    }
}

fn watch_stock(msg: Bytes) -> Response<ShopBody> {
    let Ok(req) = WatchRequest::decode(msg) else {
        return status_only(3, "not a WatchRequest");
    };
    if req.updates > MAX_UPDATES {
        return status_only(11, "at most 100 updates");
    }
    if stock(req.product_id, 0).is_none() {
        return status_only(5, "no such product");
    }
    answer(
        (0..req.updates)
            .filter_map(|i| stock(req.product_id, i))
            .collect(),
    )
}

fn total_stock(msgs: Vec<Bytes>) -> Response<ShopBody> {
    let mut total = StockTotal::default();
    for m in msgs {
        let Ok(req) = StockRequest::decode(m) else {
            return status_only(3, "not a StockRequest");
        };
        let Some(s) = stock(req.product_id, 0) else {
            return status_only(5, "no such product");
        };
        total.products += 1;
        total.quantity += u64::from(s.quantity);
    }
    answer(vec![total])
}

/// One Stock per request, in order, ending NOT_FOUND at the first unknown product
/// (after the stocks before it).
fn stock_feed(msgs: Vec<Bytes>) -> Response<ShopBody> {
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let Ok(req) = StockRequest::decode(m) else {
            return status_only(3, "not a StockRequest");
        };
        match stock(req.product_id, 0) {
            Some(s) => out.push(s),
            None => return answer_with(out, 5, "no such product"),
        }
    }
    answer(out)
}

/// A product's stock, falling by one per update: a fixed function of the id, so that
/// tests can check the values.
fn stock(product_id: u64, update: u32) -> Option<Stock> {
    if product_id == 0 || product_id > u64::from(PRODUCTS) {
        return None;
    }
    let base = (product_id * 37 % 500) as u32 + 100;
    Some(Stock {
        product_id,
        quantity: base.saturating_sub(update),
        warehouse: format!("wh-{}", product_id % 4),
    })
}

/// The request messages of a call (one for unary and server-streaming methods), read
/// within the target's body limit and [`MAX_STREAMED`].
async fn read_messages(req: Request<Incoming>) -> Result<Vec<Bytes>, &'static str> {
    let mut b = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| "request too large or broken")?
        .to_bytes();
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 5 || b[0] != 0 {
            return Err("not uncompressed gRPC messages");
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 5 + len {
            return Err("the request ends inside a message");
        }
        if out.len() == MAX_STREAMED {
            return Err("more than 1000 request messages");
        }
        b.advance(5);
        out.push(b.split_to(len));
    }
    Ok(out)
}

fn answer<M: Message>(messages: Vec<M>) -> Response<ShopBody> {
    answer_with(messages, 0, "")
}

/// The messages, then the status in the trailers.
fn answer_with<M: Message>(
    messages: Vec<M>,
    code: u32,
    message: &'static str,
) -> Response<ShopBody> {
    let mut frames = VecDeque::with_capacity(messages.len() + 1);
    for m in messages {
        let mut buf = BytesMut::with_capacity(5 + m.encoded_len());
        buf.extend_from_slice(&[0]);
        buf.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        // Encoding into a buffer sized for the message cannot fail.
        let _ = m.encode(&mut buf);
        frames.push_back(Frame::data(buf.freeze()));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if code != 0 {
        trailers.insert("grpc-message", HeaderValue::from_static(message));
    }
    frames.push_back(Frame::trailers(trailers));
    grpc_response(ShopBody::Frames(frames), None)
}

/// A trailers-only answer: the status in the headers, no message.
fn status_only(code: u32, message: &'static str) -> Response<ShopBody> {
    grpc_response(
        ShopBody::Full(Full::new(Bytes::new())),
        Some((code, message)),
    )
}

fn grpc_response(body: ShopBody, status: Option<(u32, &'static str)>) -> Response<ShopBody> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some((code, message)) = status {
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert("grpc-message", HeaderValue::from_static(message));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_is_a_fixed_function_of_the_product() {
        assert!(stock(0, 0).is_none());
        assert!(stock(u64::from(PRODUCTS) + 1, 0).is_none());
        let s = stock(7, 0).unwrap();
        assert_eq!((s.quantity, s.warehouse.as_str()), (359, "wh-3"));
        assert_eq!(stock(7, 3).unwrap().quantity, 356);
    }
}
