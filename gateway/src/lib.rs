//! aoai-gateway as a library. The binary (`main.rs`) is its command line; the fuzz targets
//! (`fuzz/`) reach the byte parsers through the modules made public here.
#![forbid(unsafe_code)]

mod admin;
mod api_version;
pub mod batchfile;
pub mod body;
pub mod config;
mod deadline;
mod errors;
mod fleet;
mod front;
pub mod http1;
pub mod keys;
pub mod multipart;
mod observe;
pub mod peek;
pub mod pipeline;
pub mod realtime;
pub mod server;
mod state;
mod tls;
pub mod upload;
mod upstream;
