//! A minimal RESP2 client: one TCP connection, one command at a time, no
//! background task.
//!
//! Only for the seed-heartbeat baseline. The seed's path costs Redis about
//! 10 µs per heartbeat; a general client that routes every reply through a
//! driver task and a channel (redis-rs's multiplexed connection) costs the
//! benchmark's process more than that on this 2-core machine, so Redis would
//! never be saturated and the baseline would measure our client instead of
//! the seed's approach. On the wire this sends exactly what any client
//! sends: a GET, its reply, a SETEX, its reply.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(Bytes),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$n` bulk string; `None` for `$-1`.
    Bulk(Option<Bytes>),
    /// `*n` array; `None` for `*-1`.
    Array(Option<Vec<Reply>>),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The connection failed.
    #[error("Redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// Redis closed the connection.
    #[error("Redis closed the connection")]
    Closed,
    /// The bytes were not RESP2.
    #[error("Redis sent something that is not RESP2: {0}")]
    Protocol(String),
    /// Redis answered with an error.
    #[error("Redis error: {0}")]
    Server(String),
}

/// One connection.
#[derive(Debug)]
pub struct RespConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl RespConn {
    /// Connects to `addr`, then sends AUTH and SELECT if given.
    pub async fn connect(
        addr: SocketAddr,
        auth: Option<(Option<&str>, &str)>,
        db: i64,
    ) -> Result<RespConn, RespError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut c = RespConn {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: BytesMut::with_capacity(4096),
        };
        if let Some((user, password)) = auth {
            match user {
                Some(u) => {
                    c.call(&[b"AUTH", u.as_bytes(), password.as_bytes()])
                        .await?
                }
                None => c.call(&[b"AUTH", password.as_bytes()]).await?,
            };
        }
        if db != 0 {
            c.call(&[b"SELECT", db.to_string().as_bytes()]).await?;
        }
        Ok(c)
    }

    /// Sends one command and reads its reply (an error reply is an `Err`).
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RespError> {
        self.wbuf.clear();
        encode(args, &mut self.wbuf);
        self.stream.write_all(&self.wbuf).await?;
        loop {
            match parse(&mut self.rbuf)? {
                Some(Reply::Error(e)) => return Err(RespError::Server(e)),
                Some(reply) => return Ok(reply),
                None => {
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        return Err(RespError::Closed);
                    }
                }
            }
        }
    }
}

/// Appends a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]], out: &mut BytesMut) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`; `None` (and `buf` untouched)
/// if it is not complete yet.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Reply>, RespError> {
    let mut pos = 0;
    match parse_at(buf, &mut pos)? {
        Some(reply) => {
            buf.advance(pos);
            Ok(Some(reply))
        }
        None => Ok(None),
    }
}

fn line(buf: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let rest = buf.get(*pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    let l = rest[..end].to_vec();
    *pos += end + 2;
    Some(l)
}

fn number(l: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RespError::Protocol(format!("bad length {:?}", String::from_utf8_lossy(l))))
}

fn parse_at(buf: &BytesMut, pos: &mut usize) -> Result<Option<Reply>, RespError> {
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let Some(l) = line(buf, pos) else {
        return Ok(None);
    };
    Ok(Some(match kind {
        b'+' => Reply::Simple(Bytes::from(l)),
        b'-' => Reply::Error(String::from_utf8_lossy(&l).into_owned()),
        b':' => Reply::Int(number(&l)?),
        b'$' => {
            let n = number(&l)?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let n = n as usize;
                if buf.len() < *pos + n + 2 {
                    return Ok(None);
                }
                let data = Bytes::copy_from_slice(&buf[*pos..*pos + n]);
                *pos += n + 2;
                Reply::Bulk(Some(data))
            }
        }
        b'*' => {
            let n = number(&l)?;
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    match parse_at(buf, pos)? {
                        Some(r) => items.push(r),
                        None => return Ok(None),
                    }
                }
                Reply::Array(Some(items))
            }
        }
        other => {
            return Err(RespError::Protocol(format!(
                "unknown reply type byte {other:#04x}"
            )));
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = BytesMut::new();
        encode(&[b"GET", b"k"], &mut out);
        assert_eq!(&out[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    #[test]
    fn parses_every_reply_kind_and_waits_for_more() {
        let mut buf = BytesMut::from(
            &b"+OK\r\n:7\r\n$3\r\nabc\r\n$-1\r\n-ERR no\r\n*2\r\n$1\r\na\r\n:1\r\n"[..],
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Reply::Simple(Bytes::from_static(b"OK")))
        );
        assert_eq!(parse(&mut buf).unwrap(), Some(Reply::Int(7)));
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Reply::Bulk(Some(Bytes::from_static(b"abc"))))
        );
        assert_eq!(parse(&mut buf).unwrap(), Some(Reply::Bulk(None)));
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Reply::Error("ERR no".into()))
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Reply::Array(Some(vec![
                Reply::Bulk(Some(Bytes::from_static(b"a"))),
                Reply::Int(1)
            ])))
        );
        assert!(buf.is_empty());
        for partial in [&b"$5\r\nab"[..], b"*2\r\n:1\r\n", b"+O", b""] {
            let mut b = BytesMut::from(partial);
            assert_eq!(parse(&mut b).unwrap(), None);
            assert_eq!(b.len(), partial.len());
        }
        assert!(parse(&mut BytesMut::from(&b"?x\r\n"[..])).is_err());
    }
}
