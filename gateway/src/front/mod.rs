//! How requests arrive: ALPN dispatch, the HTTP/1 connection loop, the HTTP/2 adapter, and
//! the [`downstream::Downstream`] trait both answer through.

pub mod downstream;
