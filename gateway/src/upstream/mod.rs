//! Everything on the backend side: which member to try ([`select`]), pooled connections
//! ([`pool`]), the upstream request ([`request`]), the gateway's own token ([`token`]) and
//! health checks ([`health`]).

pub mod health;
pub mod pool;
pub mod request;
pub mod select;
pub mod token;
