//! The stages of a request, as pure decisions over plain data (the I/O that feeds them stays
//! in `proxy.rs` and the codec).

pub mod admit;
