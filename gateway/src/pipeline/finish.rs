//! The end of a request: its metrics, the reconciliation of its limits with the usage the
//! backend reported, and its audit line — all made from its [`Outcome`].

use bytes::Bytes;

use super::outcome::{Outcome, UsageSource};
use super::{Ctx, Gateway};
use crate::observe::audit::record_of;
use crate::observe::metrics::{status_label, Label};
use crate::state::Snapshot;
use crate::upstream::select::now_ms;

/// `/healthz`: 200 when every configured deployment has an available member, else 503 with
/// the deployments that have none.
pub fn health_answer(snap: &Snapshot) -> (u16, Bytes) {
    let now = now_ms();
    let mut missing = Vec::new();
    for name in &snap.cfg.deployment_names {
        let d = &snap.cfg.deployments[&**name];
        let cools = &snap.pool.cooldowns[&**name];
        let ok = d
            .members
            .iter()
            .zip(cools)
            .any(|(m, c)| snap.pool.health[m.backend].is_healthy() && c.until_ms() <= now);
        if !ok {
            missing.push(name.to_string());
        }
    }
    let status = if missing.is_empty() { 200 } else { 503 };
    let body = serde_json::json!({
        "status": if missing.is_empty() { "ok" } else { "degraded" },
        "unavailable_deployments": missing,
    });
    (status, Bytes::from(body.to_string()))
}

impl Gateway {
    /// After the response: metrics, limit reconciliation, the audit line. Front Door's
    /// `/healthz` probes are neither traffic nor audit events.
    pub async fn finish(&self, ctx: &mut Ctx) {
        let Some(snap) = ctx.snap.take() else {
            return;
        };
        if ctx.outcome.probe {
            return;
        }
        let elapsed = ctx.start.elapsed();
        let (usage, source) = ctx.outcome.charged();
        self.count(&ctx.outcome, elapsed, usage);
        let actual = match source {
            UsageSource::Response | UsageSource::Estimated => usage.map(|u| u.total),
            _ => None,
        };
        if let Some(a) = ctx.outcome.admission.take() {
            // A settling follow-up reserved nothing for itself: its admission stands as it is.
            let own = if ctx.outcome.settle.is_some() {
                None
            } else {
                actual
            };
            snap.limiter.reconcile(&a, own).await;
        }
        if let (Some(s), Some(actual)) = (ctx.outcome.settle.take(), actual) {
            snap.limiter
                .settle(
                    &ctx.outcome.caller.client,
                    ctx.outcome.caller.user.as_deref(),
                    &s.deployment,
                    &snap.cfg.clients[s.client].limits,
                    s.reserved,
                    actual,
                    s.created,
                    std::time::SystemTime::now(),
                )
                .await;
        }
        // The wall clock at the end, from the start and the monotonic duration (made a date
        // by the audit writer thread).
        let ended = ctx.started + elapsed;
        self.audit
            .log(record_of(&mut ctx.outcome, usage, source, elapsed, ended));
    }

    /// `requests_total`, `request_duration_seconds`, `rejections_total`, `tokens_total`.
    fn count(
        &self,
        o: &Outcome,
        elapsed: std::time::Duration,
        usage: Option<filters::tokens::Usage>,
    ) {
        let deployment = o
            .deployment
            .as_ref()
            .map_or(Label::Static(""), Label::Config);
        let operation = o.operation.map_or("", |op| op.as_str());
        let client = Label::Config(&o.caller.label);
        let series =
            self.metrics
                .request_series(client, deployment, operation, status_label(o.status()));
        series.requests.inc();
        series.duration.observe(elapsed.as_secs_f64());
        if let Some(reason) = o.error.as_ref().and_then(|e| e.rejection_reason()) {
            self.metrics
                .rejections
                .with_label_values(&[&o.caller.label, reason])
                .inc();
        }
        // A realtime session's tokens were counted as each response reported them.
        if let (Some(u), Some(tried), false) = (
            usage,
            &o.tried,
            o.operation == Some(filters::Operation::Realtime),
        ) {
            let series = self
                .metrics
                .token_series(client, deployment, &tried.backend);
            series.prompt.inc_by(u.prompt);
            series.completion.inc_by(u.completion);
        }
        // Only where the backend itemized something (most answers report zeros).
        if let Some(u) = usage.filter(|u| u.details.any()) {
            let series = self.metrics.token_detail_series(client, deployment);
            for (counter, (_, n)) in series.by_type.iter().zip(u.details.by_type()) {
                counter.inc_by(n.unwrap_or(0));
            }
        }
    }
}
