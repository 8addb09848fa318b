//! What operators see: Prometheus metrics, the audit log, request ids.

pub mod audit;
pub mod metrics;
pub mod request_id;
