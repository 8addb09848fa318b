//! The limits filter: admits the request against the client's request and token limits
//! (client-wide and per deployment), reserving the estimated tokens; the gateway reconciles
//! the reservation with the backend's usage when the response ends.

use std::sync::Arc;

use crate::limits::{Admission, ClientLimits, LimitSpec, Limiter};
use crate::{FilterError, Planned, RequestFilter};

/// Whether any limit applies to this client and deployment.
pub fn has_limits(l: &ClientLimits, deployment: &str) -> bool {
    l.applies_to(deployment)
}

/// Whether a token limit applies (then the prompt must be estimated).
pub fn has_token_limits(l: &ClientLimits, deployment: &str) -> bool {
    let any = |s: &LimitSpec| s.tokens_per_minute.is_some() || s.tokens_per_day.is_some();
    any(&l.client)
        || l.per_deployment.get(deployment).is_some_and(any)
        || l.per_user
            .as_ref()
            .is_some_and(|u| has_token_limits(u, deployment))
}

pub struct LimitsFilter {
    pub limiter: Arc<Limiter>,
    /// Limits by client index (configured clients, then unlisted-client templates).
    pub limits: Arc<Vec<ClientLimits>>,
}

impl<'a> RequestFilter<Planned<'a>> for LimitsFilter {
    /// `None`: no limit applies (or `models.read`, which the gateway answers itself).
    type Pass = Option<Admission>;

    async fn apply(&self, p: &Planned<'a>) -> Result<Option<Admission>, FilterError> {
        let Some(deployment) = p.deployment else {
            return Ok(None);
        };
        let id = p.identity;
        let limits = &self.limits[id.client];
        if !has_limits(limits, deployment) {
            return Ok(None);
        }
        self.limiter
            .admit_user(
                &id.client_id,
                id.user.as_deref(),
                deployment,
                limits,
                p.reserve_tokens,
                p.now,
            )
            .await
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_presence() {
        let mut l = ClientLimits::default();
        assert!(!has_limits(&l, "d"));
        l.per_deployment.insert(
            "d".into(),
            LimitSpec {
                tokens_per_minute: Some(5),
                ..Default::default()
            },
        );
        assert!(has_limits(&l, "d"));
        assert!(has_token_limits(&l, "d"));
        assert!(!has_limits(&l, "other"));
        l.client.requests_per_minute = Some(1);
        assert!(has_limits(&l, "other"));
        assert!(!has_token_limits(&l, "other"));
        // Per-user limits count too.
        let mut l = ClientLimits::default();
        let mut user = ClientLimits::default();
        user.per_deployment.insert(
            "d".into(),
            LimitSpec {
                tokens_per_day: Some(5),
                ..Default::default()
            },
        );
        l.per_user = Some(Box::new(user));
        assert!(has_limits(&l, "d") && has_token_limits(&l, "d"));
        assert!(!has_limits(&l, "other") && !has_token_limits(&l, "other"));
    }
}
