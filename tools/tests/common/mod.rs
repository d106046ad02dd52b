//! A tiny HTTP/1.1 client on hyper's connection API for the stampede-target tests: one
//! keep-alive connection per `Client`, JSON in and out, every call under a timeout so a
//! broken target fails the test instead of hanging it. Test support only.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// Upper bound for any single request in the tests; only reached when something is broken.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client {
            sender,
            host: addr.to_string(),
        }
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .expect("request");
        let fut = async {
            self.sender.ready().await.expect("connection ready");
            let resp = self.sender.send_request(req).await.expect("send");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            Reply { status, body }
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .expect("request timed out")
    }

    /// A GET that reports failure instead of panicking: `Err` if the connection is gone.
    pub async fn try_get(&mut self, path: &str) -> Result<StatusCode, String> {
        let req = Request::get(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let fut = async {
            self.sender.ready().await.map_err(|e| e.to_string())?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())?;
            Ok(resp.status())
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn get_auth(&mut self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&mut self, path: &str, body: &str) -> Reply {
        self.send(Method::POST, path, None, Some(body)).await
    }

    pub async fn post_auth(&mut self, path: &str, token: &str, body: &str) -> Reply {
        self.send(Method::POST, path, Some(token), Some(body)).await
    }

    /// Logs in `userN` and returns the token, asserting success.
    pub async fn login(&mut self, n: u64) -> String {
        let r = self
            .post(
                "/login",
                &format!(r#"{{"user":"user{n}","password":"pass{n}"}}"#),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "login user{n}");
        r.json()["token"]
            .as_str()
            .expect("token is a string")
            .to_string()
    }
}
