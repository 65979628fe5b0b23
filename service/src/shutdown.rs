//! Shutdown: SIGTERM and Ctrl-C both start it.
//!
//! Services take a [`CancellationToken`] as a parameter (tests pass their own
//! and cancel it); binaries connect the token to the signals with
//! [`cancel_on_signal`].

use tokio_util::sync::CancellationToken;

/// Completes when SIGTERM or SIGINT (Ctrl-C) arrives; returns its name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this service");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// A token that is cancelled when SIGTERM or Ctrl-C arrives.
pub fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let name = signal().await;
        tracing::info!(signal = name, "shutdown requested");
        t.cancel();
    });
    token
}
