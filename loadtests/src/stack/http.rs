//! A minimal HTTP/1.1 client: one keep-alive connection, one request at a
//! time, no background task.
//!
//! The scenarios measure the api at thousands of requests per second on the
//! same two cores as the api and Redis; a general client (reqwest on hyper)
//! costs the load generator several times what this does per request, which
//! would show up as api latency. On the wire this is what any client sends:
//! a request line, `Host`, `Authorization`, `Content-Length`, the body.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response accepted (a page of the online list is ~20 KB).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed.
    #[error("HTTP connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection before a whole response.
    #[error("the server closed the connection before a whole response")]
    Closed,
    /// The response was not HTTP/1.1 as expected.
    #[error("the server sent something that is not an HTTP/1.1 response: {0}")]
    Protocol(String),
    /// No whole response within the deadline.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Bytes,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HttpError::Protocol(format!(
                "status {} with a body that is not the expected JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            ))
        })
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    host: String,
    auth: Option<String>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// The server asked to close after the last response.
    closed: bool,
}

impl HttpConn {
    /// Connects to `addr`; requests carry `Authorization: Bearer {token}`
    /// when a token is given.
    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Result<HttpConn, HttpError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            host: addr.to_string(),
            auth: token.map(|t| format!("Bearer {t}")),
            rbuf: BytesMut::with_capacity(8192),
            wbuf: Vec::with_capacity(512),
            closed: false,
        })
    }

    /// Whether the connection can carry another request.
    pub fn is_reusable(&self) -> bool {
        !self.closed
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Response, HttpError> {
        self.request("POST", path, Some(body)).await
    }

    /// One request and its response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        if self.closed {
            return Err(HttpError::Closed);
        }
        self.wbuf.clear();
        self.wbuf.extend_from_slice(method.as_bytes());
        self.wbuf.push(b' ');
        self.wbuf.extend_from_slice(path.as_bytes());
        self.wbuf.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.wbuf.extend_from_slice(self.host.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        if let Some(auth) = &self.auth {
            self.wbuf.extend_from_slice(b"Authorization: ");
            self.wbuf.extend_from_slice(auth.as_bytes());
            self.wbuf.extend_from_slice(b"\r\n");
        }
        if let Some(body) = body {
            self.wbuf
                .extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
            self.wbuf
                .extend_from_slice(body.len().to_string().as_bytes());
            self.wbuf.extend_from_slice(b"\r\n\r\n");
            self.wbuf.extend_from_slice(body);
        } else {
            self.wbuf.extend_from_slice(b"\r\n");
        }
        let sent = self.stream.write_all(&self.wbuf).await;
        if let Err(e) = sent {
            self.closed = true;
            return Err(e.into());
        }
        let r = self.read_response().await;
        if r.is_err() {
            self.closed = true;
        }
        r
    }

    /// [`request`](Self::request) within `limit`; a timed-out connection is
    /// not reused.
    pub async fn request_within(
        &mut self,
        limit: Duration,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        match tokio::time::timeout(limit, self.request(method, path, body)).await {
            Ok(r) => r,
            Err(_) => {
                self.closed = true;
                Err(HttpError::Timeout(limit))
            }
        }
    }

    async fn fill(&mut self) -> Result<(), HttpError> {
        if self.rbuf.len() > MAX_RESPONSE {
            return Err(HttpError::Protocol(format!(
                "response larger than {MAX_RESPONSE} bytes"
            )));
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<Response, HttpError> {
        let head_end = loop {
            if let Some(i) = find(&self.rbuf, b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = parse_head(&self.rbuf[..head_end])?;
        self.rbuf.advance(head_end + 4);
        if head.close {
            self.closed = true;
        }
        let body = match head.length {
            BodyLength::Fixed(n) => {
                while self.rbuf.len() < n {
                    self.fill().await?;
                }
                self.rbuf.split_to(n).freeze()
            }
            BodyLength::Chunked => self.read_chunked().await?,
        };
        Ok(Response {
            status: head.status,
            body,
        })
    }

    async fn read_chunked(&mut self) -> Result<Bytes, HttpError> {
        let mut body = BytesMut::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.rbuf, b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let line = std::str::from_utf8(&self.rbuf[..line_end])
                .map_err(|_| HttpError::Protocol("chunk size is not text".to_owned()))?;
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| HttpError::Protocol(format!("bad chunk size {size_hex:?}")))?;
            self.rbuf.advance(line_end + 2);
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    if let Some(i) = find(&self.rbuf, b"\r\n") {
                        let empty = i == 0;
                        self.rbuf.advance(i + 2);
                        if empty {
                            return Ok(body.freeze());
                        }
                    } else {
                        self.fill().await?;
                    }
                }
            }
            if body.len() + size > MAX_RESPONSE {
                return Err(HttpError::Protocol("chunked body too large".to_owned()));
            }
            while self.rbuf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.rbuf[..size]);
            self.rbuf.advance(size + 2);
        }
    }
}

enum BodyLength {
    Fixed(usize),
    Chunked,
}

struct Head {
    status: u16,
    length: BodyLength,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| HttpError::Protocol("response head is not text".to_owned()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Protocol(format!("status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Protocol(format!("status line {status_line:?}")))?;
    let mut length = BodyLength::Fixed(0);
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| HttpError::Protocol(format!("Content-Length {value:?}")))?;
            length = BodyLength::Fixed(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            length = BodyLength::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        length,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-connection server that answers each request with the next
    /// canned response and hands back what it received.
    async fn serve(responses: Vec<&'static str>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 4096];
            for r in responses {
                // One request: up to the blank line (and any body).
                loop {
                    let n = s.read(&mut buf).await.expect("read");
                    seen.extend_from_slice(&buf[..n]);
                    if n == 0 || find(&seen, b"\r\n\r\n").is_some() {
                        break;
                    }
                }
                s.write_all(r.as_bytes()).await.expect("write");
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn reads_fixed_and_chunked_bodies_on_one_connection() {
        let (addr, server) = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
            "HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ])
        .await;
        let mut c = HttpConn::connect(addr, Some("tok")).await.expect("connect");
        let r = c.get("/x").await.expect("first");
        assert_eq!(r.status, 200);
        assert!(r.is_success());
        let v: serde_json::Value = r.json().expect("json");
        assert_eq!(v["a"], 1);
        let r = c.post_json("/y", b"{}").await.expect("second");
        assert_eq!((r.status, &r.body[..]), (404, &b"abcde"[..]));
        let r = c.get("/z").await.expect("third");
        assert_eq!(r.status, 503);
        assert!(!c.is_reusable());
        assert!(matches!(c.get("/again").await, Err(HttpError::Closed)));
        let seen = server.await.expect("server");
        assert!(seen.contains("GET /x HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("Authorization: Bearer tok\r\n"), "{seen}");
        assert!(seen.contains("POST /y HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("Content-Length: 2\r\n\r\n{}"), "{seen}");
    }

    #[tokio::test]
    async fn garbage_and_early_close_are_errors() {
        let (addr, _server) = serve(vec!["SSH-2.0-nope\r\n\r\n"]).await;
        let mut c = HttpConn::connect(addr, None).await.expect("connect");
        assert!(matches!(c.get("/").await, Err(HttpError::Protocol(_))));
        let (addr, _server) = serve(vec!["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]).await;
        let mut c = HttpConn::connect(addr, None).await.expect("connect");
        let r = c
            .request_within(Duration::from_millis(300), "GET", "/", None)
            .await;
        assert!(
            matches!(r, Err(HttpError::Timeout(_)) | Err(HttpError::Closed)),
            "{r:?}"
        );
    }
}
