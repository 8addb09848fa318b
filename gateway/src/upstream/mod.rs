//! Everything on the backend side: which member to try ([`select`], with the backends'
//! capacity reports: [`capacity`]), pooled connections
//! ([`pool`]), the upstream request ([`request`]), the gateway's own token ([`token`]) and
//! health checks ([`health`]).

pub mod capacity;
pub mod health;
pub mod pool;
pub mod request;
pub mod select;
pub mod token;
