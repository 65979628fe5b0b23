//! A TCP proxy on a free loopback port that a test can cut: the way to cut
//! one service off from Redis while the others still reach it (a network
//! partition), which stopping Redis cannot do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// A proxy to `upstream`. While cut, its connections are closed and new
/// ones are closed at once; [`restore`](Self::restore) lets them through
/// again. Stops when dropped.
pub struct TcpProxy {
    addr: String,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Vec<AbortHandle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the proxy's port on 127.0.0.1");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(State::default());
        let upstream = upstream.to_owned();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                if st.cut.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                let mut conns = st.lock();
                conns.retain(|c| !c.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    /// The proxy's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `redis://{addr}/` for a Redis behind the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Closes every proxied connection and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for c in self.state.lock().drain(..) {
            c.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.lock().drain(..) {
            c.abort();
        }
    }
}
