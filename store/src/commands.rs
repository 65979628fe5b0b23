//! The command log (filled in with the downlink commands).
