//! The HTTP face of stampede-target: routing, the load path (count → queue for the
//! concurrency limit → latency → stall → injected error → shop), and the admin endpoints
//! `/_stats`, `/_stats/reset` and `/_control`, which bypass every knob and are not counted
//! as load. Business rules live in `shop`, counters in `stats`, knob storage in `knobs`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::grpc::ShopBody;
use crate::knobs::{ControlUpdate, Knobs};
use crate::shop::{AuthError, CartError, Session, Shop};
use crate::stats::{Endpoint, Stats};

/// Largest request body the target reads; bigger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;

pub(crate) type Resp = Response<Full<Bytes>>;

/// Everything one running target shares between its connections.
pub(crate) struct Shared {
    pub(crate) shop: Shop,
    pub(crate) stats: Stats,
    pub(crate) knobs: Knobs,
    /// Per-source-network delays (fixed at start).
    pub(crate) delay_from: Vec<crate::SourceDelay>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Login,
    Search,
    /// `None` when the id is not a number.
    Product(Option<u64>),
    Cart,
    Checkout,
    Account,
    OrdersWs,
    NotFound,
    WrongMethod(&'static str),
    Stats,
    StatsReset,
    Control,
    /// A storefront file: (content type, body).
    Page(&'static str, &'static str),
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let want = |allowed: &'static str, route: Route| {
            if method.as_str() == allowed {
                route
            } else {
                Route::WrongMethod(allowed)
            }
        };
        if let Some((ctype, body)) = crate::storefront::file(path) {
            return want("GET", Route::Page(ctype, body));
        }
        match path {
            "/login" => want("POST", Route::Login),
            "/products" => want("GET", Route::Search),
            "/cart" => want("POST", Route::Cart),
            "/checkout" => want("POST", Route::Checkout),
            "/account" => want("GET", Route::Account),
            "/ws/orders" => want("GET", Route::OrdersWs),
            "/_stats" => want("GET", Route::Stats),
            "/_stats/reset" => want("POST", Route::StatsReset),
            "/_control" if method == Method::GET || method == Method::POST => Route::Control,
            "/_control" => Route::WrongMethod("GET, POST"),
            _ => match path.strip_prefix("/products/") {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    want("GET", Route::Product(id.parse().ok()))
                }
                _ => Route::NotFound,
            },
        }
    }

    /// The load endpoint this route counts under; `None` for admin routes.
    fn endpoint(self) -> Option<Endpoint> {
        Some(match self {
            Route::Login => Endpoint::Login,
            Route::Search => Endpoint::Search,
            Route::Product(_) => Endpoint::Product,
            Route::Cart => Endpoint::Cart,
            Route::Checkout => Endpoint::Checkout,
            Route::Account => Endpoint::Account,
            Route::OrdersWs => Endpoint::OrdersWs,
            Route::NotFound | Route::WrongMethod(_) => Endpoint::Other,
            Route::Stats | Route::StatsReset | Route::Control | Route::Page(..) => return None,
        })
    }
}

/// Runs a closure when dropped, so gauges stay right when a client hangs up mid-request.
pub(crate) struct OnDrop<F: FnMut()>(pub(crate) F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The per-request entry point hyper calls.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    source_delay: std::time::Duration,
) -> Result<Response<ShopBody>, Infallible> {
    if crate::grpc::is_grpc(&req) {
        return Ok(crate::grpc::handle(&shared, req).await);
    }
    handle_http(shared, req, source_delay)
        .await
        .map(|r| r.map(ShopBody::Full))
}

async fn handle_http(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    source_delay: std::time::Duration,
) -> Result<Resp, Infallible> {
    let route = Route::of(req.method(), req.uri().path());
    let Some(endpoint) = route.endpoint() else {
        shared.stats.admin();
        return Ok(admin(&shared, route, req).await);
    };
    shared.stats.received(endpoint);
    if route == Route::OrdersWs {
        // A socket lives on: the knobs (latency, errors, the concurrency limit) are for
        // requests and do not apply to it.
        let resp = crate::live::upgrade(shared.clone(), req);
        shared.stats.responded(resp.status().as_u16());
        return Ok(resp);
    }
    // A far-away client: its requests wait as if on a long network path, outside the
    // service's concurrency limit.
    if !source_delay.is_zero() {
        tokio::time::sleep(source_delay).await;
    }
    let resp = serve_load(&shared, route, req).await;
    shared.stats.responded(resp.status().as_u16());
    Ok(resp)
}

async fn serve_load(shared: &Shared, route: Route, req: Request<Incoming>) -> Resp {
    let (stats, knobs) = (&shared.stats, &shared.knobs);
    let _permit = match knobs.limiter() {
        None => None,
        Some(limiter) => {
            stats.enter_queue();
            let _queued = OnDrop(|| stats.leave_queue());
            // The semaphore is never closed, so an error cannot happen; serve anyway.
            limiter.acquire_owned().await.ok()
        }
    };
    stats.enter_service();
    let _in_service = OnDrop(|| stats.leave_service());

    let latency = knobs.latency();
    if !latency.is_none() {
        let d = latency.sample(&mut rand::rng());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
    if !knobs.stall().is_zero() {
        knobs.wait_stall(tokio::time::Instant::now()).await;
    }
    let rate = knobs.error_rate();
    if rate > 0.0 && rand::random::<f64>() < rate {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
    }
    dispatch(&shared.shop, route, req).await
}

async fn dispatch(shop: &Shop, route: Route, req: Request<Incoming>) -> Resp {
    match route {
        Route::Login => login(shop, req).await,
        Route::Search => {
            let q = req.uri().query().and_then(|q| query_param(q, "q"));
            json(StatusCode::OK, shop.search(q.as_deref().unwrap_or("")))
        }
        Route::Product(id) => match id.and_then(|id| shop.product(id)) {
            Some(body) => json(StatusCode::OK, body),
            None => error(StatusCode::NOT_FOUND, "no such product"),
        },
        Route::Cart => {
            let session = match session(shop, &req) {
                Ok(s) => s,
                Err(e) => return auth_error(e),
            };
            let body = match read_json(req).await {
                Ok(v) => v,
                Err(resp) => return resp,
            };
            let fields = number_field(&body, "product").and_then(|p| {
                let p = p.ok_or_else(|| "missing field \"product\"".to_string())?;
                Ok((p, number_field(&body, "qty")?.unwrap_or(1)))
            });
            let (product, qty) = match fields {
                Ok(f) => f,
                Err(msg) => return error_owned(StatusCode::BAD_REQUEST, msg),
            };
            match shop.add_to_cart(session, product, qty) {
                Err(e) => auth_error(e),
                Ok(Err(CartError::NoSuchProduct)) => {
                    error(StatusCode::NOT_FOUND, "no such product")
                }
                Ok(Err(CartError::BadQuantity)) => error(
                    StatusCode::BAD_REQUEST,
                    "qty must be 1 ..= 10000 per product in the cart",
                ),
                Ok(Ok(items)) => json_value(StatusCode::OK, &serde_json::json!({"items": items})),
            }
        }
        Route::Checkout => match session(shop, &req).and_then(|s| shop.checkout(s)) {
            Err(e) => auth_error(e),
            Ok(None) => error(StatusCode::BAD_REQUEST, "cart empty"),
            Ok(Some(order)) => json_value(StatusCode::OK, &order),
        },
        Route::Account => match session(shop, &req).and_then(|s| shop.account(s)) {
            Err(e) => auth_error(e),
            Ok(view) => json_value(StatusCode::OK, &view),
        },
        Route::WrongMethod(allowed) => {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
            resp
        }
        // OrdersWs is upgraded in `handle` before the knobs; never dispatched.
        Route::OrdersWs
        | Route::NotFound
        | Route::Stats
        | Route::StatsReset
        | Route::Control
        | Route::Page(..) => error(StatusCode::NOT_FOUND, "not found"),
    }
}

#[derive(Deserialize)]
struct LoginBody {
    user: String,
    password: String,
}

async fn login(shop: &Shop, req: Request<Incoming>) -> Resp {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let creds: LoginBody = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error_owned(StatusCode::BAD_REQUEST, format!("login body: {e}")),
    };
    match shop.login(&creds.user, &creds.password) {
        Some(token) => json_value(StatusCode::OK, &serde_json::json!({ "token": token })),
        None => error(StatusCode::UNAUTHORIZED, "bad user or password"),
    }
}

fn session(shop: &Shop, req: &Request<Incoming>) -> Result<Session, AuthError> {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    shop.authenticate(token)
}

fn auth_error(e: AuthError) -> Resp {
    match e {
        AuthError::Missing => error(StatusCode::UNAUTHORIZED, "missing bearer token"),
        AuthError::Unknown => error(StatusCode::UNAUTHORIZED, "unknown token"),
        AuthError::Ended => error(
            StatusCode::CONFLICT,
            "session ended by a newer login of this account",
        ),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body larger than 64 KiB",
        )),
        Err(e) => Err(error_owned(
            StatusCode::BAD_REQUEST,
            format!("reading body: {e}"),
        )),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, Resp> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error_owned(StatusCode::BAD_REQUEST, format!("JSON body: {e}")))
}

/// A non-negative integer field; a numeric string counts too, because plan templates
/// render values into strings.
fn number_field(body: &serde_json::Value, name: &str) -> Result<Option<u64>, String> {
    let bad = || format!("field {name:?} must be a positive integer");
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
        Some(serde_json::Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

/// The decoded value of `name` in a query string (`+` and `%XX` decoded).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn admin(shared: &Shared, route: Route, req: Request<Incoming>) -> Resp {
    match route {
        Route::Stats => {
            // Every request received counts, admin ones too, except this one.
            let mut snap = shared.stats.snapshot();
            snap.requests = snap.load_requests + snap.admin_requests.saturating_sub(1);
            json_value(StatusCode::OK, &snap)
        }
        Route::StatsReset => {
            shared.stats.reset();
            json_value(StatusCode::OK, &shared.stats.snapshot())
        }
        Route::Control if req.method() == Method::GET => {
            json_value(StatusCode::OK, &shared.knobs.state())
        }
        Route::Control => control(&shared.knobs, req).await,
        Route::Page(ctype, body) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
            resp
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn control(knobs: &Knobs, req: Request<Incoming>) -> Resp {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let update: ControlUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return error_owned(StatusCode::BAD_REQUEST, format!("control body: {e}")),
    };
    match knobs.apply(&update) {
        Ok(state) => json_value(StatusCode::OK, &state),
        Err(e) => error_owned(StatusCode::BAD_REQUEST, e.0),
    }
}

fn json(status: StatusCode, body: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn json_value<T: serde::Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(v) => json(status, Bytes::from(v)),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding response"),
    }
}

fn error(status: StatusCode, msg: &'static str) -> Resp {
    error_owned(status, msg.to_string())
}

fn error_owned(status: StatusCode, msg: String) -> Resp {
    json_value(status, &serde_json::json!({ "error": msg }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(Route::of(&post, "/login"), Route::Login);
        assert_eq!(Route::of(&get, "/login"), Route::WrongMethod("POST"));
        assert_eq!(Route::of(&get, "/products/12"), Route::Product(Some(12)));
        assert_eq!(Route::of(&get, "/products/x"), Route::Product(None));
        assert_eq!(Route::of(&get, "/products/"), Route::NotFound);
        assert_eq!(Route::of(&get, "/products/1/2"), Route::NotFound);
        assert_eq!(Route::of(&get, "/nope"), Route::NotFound);
        assert_eq!(Route::of(&post, "/_control"), Route::Control);
        assert_eq!(Route::of(&get, "/_stats").endpoint(), None);
        assert_eq!(Route::of(&get, "/nope").endpoint(), Some(Endpoint::Other));
        assert!(matches!(
            Route::of(&get, "/"),
            Route::Page("text/html; charset=utf-8", _)
        ));
        assert_eq!(Route::of(&get, "/shop.js").endpoint(), None);
        assert_eq!(Route::of(&post, "/"), Route::WrongMethod("GET"));
    }

    #[test]
    fn query_decoding() {
        assert_eq!(query_param("q=red+oak", "q").as_deref(), Some("red oak"));
        assert_eq!(
            query_param("a=1&q=red%20oak", "q").as_deref(),
            Some("red oak")
        );
        assert_eq!(query_param("q=%zz%", "q").as_deref(), Some("%zz%"));
        assert_eq!(query_param("q=%4", "q").as_deref(), Some("%4"));
        assert_eq!(query_param("q", "q").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "q"), None);
    }
}
