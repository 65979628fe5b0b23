//! The Redis a baseline runs against: a private redis-server (the default)
//! or a loopback URL, with a key prefix that keeps the benchmark's keys
//! apart from anything else there.

use anyhow::Context as _;
use iot_core::Keys;
use redis::aio::MultiplexedConnection;

use crate::baseline::resp::RespConn;
use crate::loopback::check_redis_url;
use crate::servers::RedisProcess;

/// Where a baseline's Redis is.
#[derive(Debug)]
pub struct RedisTarget {
    url: String,
    private: Option<RedisProcess>,
    client: redis::Client,
    /// Key names (with the benchmark's prefix).
    pub keys: Keys,
}

impl RedisTarget {
    /// Uses `url` (loopback only; keys get `prefix`, by default a unique
    /// `bench-xxxxxxxx:` so that a shared server is not disturbed), or
    /// starts a private `bin` (keys get `prefix`, by default none: exactly
    /// the seed's names).
    pub async fn open(
        url: Option<&str>,
        bin: &str,
        prefix: Option<&str>,
    ) -> anyhow::Result<RedisTarget> {
        let (url, private, default_prefix) = match url {
            Some(u) => {
                check_redis_url(u)?;
                let id = uuid::Uuid::new_v4().simple().to_string();
                (u.to_owned(), None, format!("bench-{}:", &id[..8]))
            }
            None => {
                let p = RedisProcess::start(bin).await?;
                (p.url(), Some(p), String::new())
            }
        };
        let keys = Keys::new(prefix.map(str::to_owned).unwrap_or(default_prefix))?;
        let client =
            redis::Client::open(url.as_str()).with_context(|| format!("bad Redis URL {url}"))?;
        let me = RedisTarget {
            url,
            private,
            client,
            keys,
        };
        let mut c = me.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .with_context(|| format!("Redis at {} does not answer PING", me.url))?;
        Ok(me)
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is a private server started for the benchmark.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// A new connection of its own (one TCP connection).
    pub async fn conn(&self) -> anyhow::Result<MultiplexedConnection> {
        self.client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot connect to Redis at {}", self.url))
    }

    /// A minimal RESP connection of its own (see [`crate::baseline::resp`]).
    pub async fn resp_conn(&self) -> anyhow::Result<RespConn> {
        let info = self.client.get_connection_info();
        let (host, port) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => anyhow::bail!("the raw client needs a plain TCP Redis URL, not {other:?}"),
        };
        let addr = crate::loopback::resolve_loopback(&format!("{host}:{port}"))?;
        let settings = info.redis_settings();
        let auth = settings.password().map(|pw| (settings.username(), pw));
        RespConn::connect(addr, auth, settings.db())
            .await
            .with_context(|| format!("cannot connect to Redis at {}", self.url))
    }

    /// used_cpu_sys + used_cpu_user of the server, in seconds (INFO CPU).
    pub async fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let mut c = self.conn().await?;
        let info: String = redis::cmd("INFO").arg("CPU").query_async(&mut c).await?;
        parse_info_cpu(&info).context("INFO CPU has no used_cpu_sys/used_cpu_user")
    }

    /// `redis_version` from INFO SERVER.
    pub async fn version(&self) -> String {
        let Ok(mut c) = self.conn().await else {
            return String::new();
        };
        let info: String = redis::cmd("INFO")
            .arg("SERVER")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        info_field(&info, "redis_version")
            .unwrap_or_default()
            .to_owned()
    }

    /// Empties the server (private) or deletes the keys under the prefix
    /// (shared; nothing if the prefix is empty).
    pub async fn clear(&self) -> anyhow::Result<()> {
        let mut c = self.conn().await?;
        if self.is_private() {
            let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await?;
            return Ok(());
        }
        if self.keys.prefix().is_empty() {
            return Ok(());
        }
        let pattern = format!("{}*", self.keys.prefix());
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !batch.is_empty() {
                let _: () = redis::cmd("UNLINK").arg(&batch).query_async(&mut c).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// used_cpu_sys + used_cpu_user from an INFO CPU reply.
pub fn parse_info_cpu(info: &str) -> Option<f64> {
    let sys: f64 = info_field(info, "used_cpu_sys")?.parse().ok()?;
    let user: f64 = info_field(info, "used_cpu_user")?.parse().ok()?;
    Some(sys + user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_cpu() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:0.0\r\n";
        assert_eq!(parse_info_cpu(info), Some(3.75));
        assert_eq!(parse_info_cpu("# CPU\r\n"), None);
        assert_eq!(
            info_field("redis_version:7.0.15\r\n", "redis_version"),
            Some("7.0.15")
        );
    }
}
