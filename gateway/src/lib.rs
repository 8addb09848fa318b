//! aoai-gateway as a library. The binary (`main.rs`) is its command line; the fuzz targets
//! (`fuzz/`) reach the byte parsers through the modules made public here.
#![forbid(unsafe_code)]

mod admin;
mod audit;
pub mod body;
pub mod config;
mod deadline;
mod downstream;
mod errors;
mod health;
pub mod http1;
pub mod keys;
mod metrics;
pub mod peek;
pub mod pipeline;
mod pool;
mod proxy;
mod request_id;
mod route;
pub mod server;
mod state;
mod tls;
mod upstream;
mod upstream_token;
