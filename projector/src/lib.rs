//! projector (in progress)
