//! Every error the gateway answers itself, mapped to status, headers and JSON body in one
//! place (SPEC §8). No message contains a key, token or stack trace.

use std::borrow::Cow;

use bytes::Bytes;
use filters::FilterError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MissingCredential,
    InvalidCredential,
    Forbidden,
    ForbiddenOrigin,
    DeploymentNotAllowed,
    OperationNotAllowed,
    DeploymentNotFound,
    OperationNotSupported,
    RequestTooLarge,
    InvalidRequestBody,
    /// A request head that did not arrive within `server.header_timeout_seconds` (extension).
    RequestTimeout,
    /// The client went away before the response ended (SPEC §8; logged, never answered).
    ClientClosedRequest,
    RateLimitExceeded,
    QuotaExceeded,
    BackendThrottled,
    BackendUnavailable,
    BackendTimeout,
    BadGateway,
    LimitStoreUnavailable,
    /// A stored object that is unknown, expired or someone else's (SPEC §11, §14).
    ObjectNotFound,
    /// References to objects on two resources, or to a resource the deployment has no
    /// member on (SPEC §11, §14).
    ObjectConflict,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingCredential => "MissingCredential",
            ErrorCode::InvalidCredential => "InvalidCredential",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::ForbiddenOrigin => "ForbiddenOrigin",
            ErrorCode::DeploymentNotAllowed => "DeploymentNotAllowed",
            ErrorCode::OperationNotAllowed => "OperationNotAllowed",
            ErrorCode::DeploymentNotFound => "DeploymentNotFound",
            ErrorCode::OperationNotSupported => "OperationNotSupported",
            ErrorCode::RequestTooLarge => "RequestTooLarge",
            ErrorCode::InvalidRequestBody => "InvalidRequestBody",
            ErrorCode::RequestTimeout => "RequestTimeout",
            ErrorCode::ClientClosedRequest => "ClientClosedRequest",
            ErrorCode::RateLimitExceeded => "RateLimitExceeded",
            ErrorCode::QuotaExceeded => "QuotaExceeded",
            ErrorCode::BackendThrottled => "BackendThrottled",
            ErrorCode::BackendUnavailable => "BackendUnavailable",
            ErrorCode::BackendTimeout => "BackendTimeout",
            ErrorCode::BadGateway => "BadGateway",
            ErrorCode::LimitStoreUnavailable => "LimitStoreUnavailable",
            ErrorCode::ObjectNotFound => "ObjectNotFound",
            ErrorCode::ObjectConflict => "ObjectConflict",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MissingCredential | ErrorCode::InvalidCredential => 401,
            ErrorCode::Forbidden
            | ErrorCode::ForbiddenOrigin
            | ErrorCode::DeploymentNotAllowed
            | ErrorCode::OperationNotAllowed => 403,
            ErrorCode::DeploymentNotFound
            | ErrorCode::OperationNotSupported
            | ErrorCode::ObjectNotFound => 404,
            ErrorCode::ObjectConflict => 409,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::InvalidRequestBody => 400,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::ClientClosedRequest => 499,
            ErrorCode::RateLimitExceeded
            | ErrorCode::QuotaExceeded
            | ErrorCode::BackendThrottled => 429,
            ErrorCode::BackendUnavailable | ErrorCode::LimitStoreUnavailable => 503,
            ErrorCode::BackendTimeout => 504,
            ErrorCode::BadGateway => 502,
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            ErrorCode::MissingCredential => "No credential was presented: send an api-key header, a bearer token or a client certificate.",
            ErrorCode::InvalidCredential => "The credential presented is not valid.",
            ErrorCode::Forbidden => "The caller is not allowed to use this gateway.",
            ErrorCode::ForbiddenOrigin => "Requests must arrive through the configured Front Door.",
            ErrorCode::DeploymentNotAllowed => "The caller may not use this deployment.",
            ErrorCode::OperationNotAllowed => "The caller may not use this operation.",
            ErrorCode::DeploymentNotFound => "No such deployment is configured.",
            ErrorCode::OperationNotSupported => "This operation is not supported by the gateway.",
            ErrorCode::RequestTooLarge => "The request body is too large.",
            ErrorCode::InvalidRequestBody => "The request body is not valid JSON for this operation.",
            ErrorCode::RequestTimeout => "The request was not received in time.",
            ErrorCode::ClientClosedRequest => "The client closed the connection before the response ended.",
            ErrorCode::RateLimitExceeded => "Rate limit exceeded: retry after the time in the Retry-After header.",
            ErrorCode::QuotaExceeded => "Daily token quota exceeded: retry after the time in the Retry-After header.",
            ErrorCode::BackendThrottled => "Every backend of this deployment is throttled: retry after the time in the Retry-After header.",
            ErrorCode::BackendUnavailable => "No backend of this deployment is available.",
            ErrorCode::BackendTimeout => "The backend did not answer in time.",
            ErrorCode::BadGateway => "No backend answered.",
            ErrorCode::LimitStoreUnavailable => "The shared limit store is unavailable.",
            ErrorCode::ObjectNotFound => "No such object.",
            ErrorCode::ObjectConflict => "The objects this request names are not on one resource that serves its deployment.",
        }
    }

    /// The `reason` label of `aoai_gateway_rejections_total`, for refusals of the client.
    pub fn rejection_reason(self) -> Option<&'static str> {
        match self {
            ErrorCode::MissingCredential | ErrorCode::InvalidCredential => Some("unauthenticated"),
            ErrorCode::Forbidden
            | ErrorCode::ForbiddenOrigin
            | ErrorCode::DeploymentNotAllowed
            | ErrorCode::OperationNotAllowed => Some("forbidden"),
            ErrorCode::RateLimitExceeded => Some("rate_limited"),
            ErrorCode::QuotaExceeded => Some("quota_exceeded"),
            ErrorCode::InvalidRequestBody => Some("bad_request"),
            ErrorCode::RequestTooLarge => Some("too_large"),
            ErrorCode::DeploymentNotFound
            | ErrorCode::OperationNotSupported
            | ErrorCode::ObjectNotFound => Some("not_found"),
            ErrorCode::ObjectConflict => Some("bad_request"),
            _ => None,
        }
    }
}

/// An answer the gateway gives itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// For 429s: the wait in milliseconds (`Retry-After` rounded up, `retry-after-ms` exact).
    pub retry_after_ms: Option<u64>,
    /// For `aoai_gateway_rejections_total`: a token limit rather than a request limit.
    pub token_limited: bool,
}

impl GatewayError {
    pub fn new(code: ErrorCode) -> Self {
        GatewayError {
            code,
            message: Cow::Borrowed(code.default_message()),
            retry_after_ms: None,
            token_limited: false,
        }
    }

    pub fn with_message(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        GatewayError {
            message: message.into(),
            ..GatewayError::new(code)
        }
    }

    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn rejection_reason(&self) -> Option<&'static str> {
        if self.code == ErrorCode::RateLimitExceeded && self.token_limited {
            return Some("token_limited");
        }
        self.code.rejection_reason()
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}});
        Bytes::from(v.to_string())
    }

    /// Extra headers besides content-type/length and x-request-id.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if self.status() == 401 {
            h.push(("www-authenticate", "Bearer".to_string()));
        }
        if let Some(ms) = self.retry_after_ms {
            h.push(("retry-after", ms.div_ceil(1000).max(1).to_string()));
            h.push(("retry-after-ms", ms.to_string()));
        }
        h
    }
}

impl From<crate::upload::UploadError> for GatewayError {
    fn from(e: crate::upload::UploadError) -> Self {
        use crate::upload::UploadError;
        let message = match e {
            UploadError::Form(why) => format!("The multipart form could not be read: {why}."),
            UploadError::Batch(why) => format!(
                "The batch file is refused: {why}; every line must be JSON naming one deployment in `body.model`."
            ),
            UploadError::FieldsFirst => "A large form must send its `model` field (or `purpose`, and a batch file's first line) before the file, within `server.max_request_body_bytes`: the gateway streams the file to the backend.".to_string(),
        };
        GatewayError::with_message(ErrorCode::InvalidRequestBody, message)
    }
}

impl From<FilterError> for GatewayError {
    fn from(e: FilterError) -> Self {
        match e {
            FilterError::MissingCredential => GatewayError::new(ErrorCode::MissingCredential),
            FilterError::InvalidCredential | FilterError::RevokedKey { .. } => {
                GatewayError::new(ErrorCode::InvalidCredential)
            }
            FilterError::Forbidden => GatewayError::new(ErrorCode::Forbidden),
            FilterError::DeploymentNotAllowed => GatewayError::new(ErrorCode::DeploymentNotAllowed),
            FilterError::OperationNotAllowed => GatewayError::new(ErrorCode::OperationNotAllowed),
            FilterError::RateLimitExceeded {
                retry_after_ms,
                tokens,
            } => GatewayError {
                token_limited: tokens,
                ..GatewayError::new(ErrorCode::RateLimitExceeded).retry_after(retry_after_ms)
            },
            FilterError::QuotaExceeded { retry_after_ms } => {
                GatewayError::new(ErrorCode::QuotaExceeded).retry_after(retry_after_ms)
            }
            FilterError::LimitStoreUnavailable => {
                GatewayError::new(ErrorCode::LimitStoreUnavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape_and_statuses() {
        let e = GatewayError::new(ErrorCode::InvalidCredential);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "InvalidCredential");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        assert_eq!(e.status(), 401);
        assert_eq!(
            e.headers(),
            vec![("www-authenticate", "Bearer".to_string())]
        );
    }

    #[test]
    fn retry_headers_round_up() {
        let e: GatewayError = FilterError::RateLimitExceeded {
            retry_after_ms: 1500,
            tokens: true,
        }
        .into();
        assert_eq!(e.status(), 429);
        assert_eq!(
            e.headers(),
            vec![
                ("retry-after", "2".into()),
                ("retry-after-ms", "1500".into())
            ]
        );
        assert_eq!(e.rejection_reason(), Some("token_limited"));
    }

    #[test]
    fn statuses_match_spec() {
        use ErrorCode::*;
        for (c, s) in [
            (MissingCredential, 401),
            (Forbidden, 403),
            (ForbiddenOrigin, 403),
            (DeploymentNotFound, 404),
            (OperationNotSupported, 404),
            (RequestTooLarge, 413),
            (InvalidRequestBody, 400),
            (QuotaExceeded, 429),
            (BackendThrottled, 429),
            (BackendUnavailable, 503),
            (BackendTimeout, 504),
            (BadGateway, 502),
            (LimitStoreUnavailable, 503),
            (ObjectNotFound, 404),
            (ObjectConflict, 409),
        ] {
            assert_eq!(c.status(), s, "{c:?}");
        }
    }
}
