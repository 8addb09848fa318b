//! What a request asks for, decided from its route and its body: the operation, and either
//! the gateway's own models list or a configured deployment with the upstream path to use.

use std::sync::Arc;

use filters::Operation;

use crate::config::runtime::Deployment;
use crate::errors::{ErrorCode, GatewayError};
use crate::pipeline::route::{ObjectAction, Route};

/// The operation of a routed request. Unsupported paths are refused here — after identity,
/// so that the refusal is counted against the caller that made it.
/// Its second part is the path after the deployment (`/chat/completions`), for the body's
/// rules; empty where the path names no deployment.
pub fn operation<'a>(route: &Route<'a>) -> Result<(Operation, &'a str), GatewayError> {
    match *route {
        Route::NotSupported => Err(GatewayError::new(ErrorCode::OperationNotSupported)),
        Route::Models | Route::Model { .. } => Ok((Operation::ModelsRead, "")),
        Route::InBody { operation, rest } => Ok((operation, rest)),
        Route::Stored { operation, .. } => Ok((operation, "")),
        Route::Upload => Ok((Operation::Files, "")),
        Route::CreateBatch => Ok((Operation::Batches, "")),
        Route::List { operation } => Ok((operation, "")),
        Route::Realtime { .. } => Ok((Operation::Realtime, "")),
        Route::InPath {
            operation, rest, ..
        } => Ok((operation, rest)),
    }
}

/// Where the upstream request goes on a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path<'a> {
    /// The client's path (`/openai/v1/...`, the deployment named in the body).
    AsSent(&'a str),
    /// `/openai/deployments/{the member's deployment}{rest}`.
    Deployment { rest: &'a str },
}

/// What the gateway will do for a request.
#[derive(Debug, Clone)]
pub enum Plan<'a> {
    /// `models.read`: answered by the gateway from the caller's policy.
    Models,
    /// `models.read` of one deployment by its client-facing name.
    Model { id: &'a str },
    Forward {
        deployment: Arc<Deployment>,
        path: Path<'a>,
    },
    /// A request on a stored object named in its path: its record decides the deployment
    /// and the backend; the path goes upstream as sent.
    Stored {
        id: &'a str,
        action: ObjectAction,
        path: &'a str,
    },
    /// A file upload to a member of `deployment` (the one its batch lines name, `?deployment=`,
    /// or the first the caller may use); the path goes upstream as sent.
    Upload {
        deployment: Arc<Deployment>,
        path: &'a str,
    },
    /// A new batch: pinned to its input file's holder (the record decides).
    CreateBatch { path: &'a str },
    /// The caller's own files or batches, gathered from the backends.
    List { operation: Operation, path: &'a str },
}

/// The deployment a request is for — named in its path, else in the body's `model` — looked
/// up among the configured ones (`lookup`).
pub fn plan<'a>(
    route: &Route<'a>,
    path: &'a str,
    model: Option<&str>,
    lookup: impl Fn(&str) -> Option<Arc<Deployment>>,
) -> Result<Plan<'a>, GatewayError> {
    let (name, path) = match *route {
        // Realtime sessions are planned by their own stage (`pipeline/realtime.rs`).
        Route::NotSupported | Route::Realtime { .. } => {
            return Err(GatewayError::new(ErrorCode::OperationNotSupported))
        }
        Route::Models => return Ok(Plan::Models),
        Route::Model { id } => return Ok(Plan::Model { id }),
        Route::Stored { id, action, .. } => return Ok(Plan::Stored { id, action, path }),
        Route::CreateBatch => return Ok(Plan::CreateBatch { path }),
        Route::List { operation } => return Ok(Plan::List { operation, path }),
        Route::Upload => {
            let name = model.ok_or_else(|| GatewayError::new(ErrorCode::DeploymentNotAllowed))?;
            return match lookup(name) {
                Some(deployment) => Ok(Plan::Upload { deployment, path }),
                None => Err(GatewayError::new(ErrorCode::DeploymentNotFound)),
            };
        }
        Route::InPath {
            deployment, rest, ..
        } => (deployment, Path::Deployment { rest }),
        Route::InBody { .. } => {
            let model = model.ok_or_else(|| {
                GatewayError::with_message(
                    ErrorCode::InvalidRequestBody,
                    "The request body must name the deployment in `model`.",
                )
            })?;
            (model, Path::AsSent(path))
        }
    };
    match lookup(name) {
        Some(deployment) => Ok(Plan::Forward { deployment, path }),
        None => Err(GatewayError::new(ErrorCode::DeploymentNotFound)),
    }
}

/// The configured deployment a path names, known before identity so that refusals are
/// counted against it (never a name that is not configured: labels come from configuration).
pub fn named_deployment(
    route: &Route<'_>,
    lookup: impl Fn(&str) -> Option<Arc<Deployment>>,
) -> Option<Arc<str>> {
    match *route {
        Route::InPath { deployment, .. } => lookup(deployment).map(|d| d.name.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::route::classify;

    fn lookup(name: &str) -> Option<Arc<Deployment>> {
        (name == "gpt-4o").then(|| {
            Arc::new(Deployment {
                name: Arc::from("gpt-4o"),
                members: Vec::new(),
            })
        })
    }

    fn planned(method: &str, path: &str, model: Option<&str>) -> Result<String, ErrorCode> {
        let route = classify(method, path);
        match plan(&route, path, model, lookup) {
            Ok(Plan::Models) => Ok("models".into()),
            Ok(Plan::Model { id }) => Ok(format!("model {id}")),
            Ok(Plan::Stored { id, action, path }) => Ok(format!("{id} {action:?} {path}")),
            Ok(Plan::Forward { deployment, path }) => Ok(format!("{} {path:?}", deployment.name)),
            Ok(Plan::Upload { deployment, path }) => {
                Ok(format!("upload {} {path}", deployment.name))
            }
            Ok(Plan::CreateBatch { path }) => Ok(format!("batch {path}")),
            Ok(Plan::List { operation, path }) => Ok(format!("list {operation:?} {path}")),
            Err(e) => Err(e.code),
        }
    }

    #[test]
    fn plan_table() {
        use ErrorCode::*;
        let chat = "/openai/deployments/gpt-4o/chat/completions";
        for (method, path, model, want) in [
            ("GET", "/openai/models", None, Ok("models".to_string())),
            (
                "POST",
                chat,
                Some("ignored"),
                Ok("gpt-4o Deployment { rest: \"/chat/completions\" }".into()),
            ),
            (
                "POST",
                "/openai/v1/chat/completions",
                Some("gpt-4o"),
                Ok("gpt-4o AsSent(\"/openai/v1/chat/completions\")".into()),
            ),
            (
                "POST",
                "/openai/v1/chat/completions",
                None,
                Err(InvalidRequestBody),
            ),
            (
                "POST",
                "/openai/v1/chat/completions",
                Some("gpt-5"),
                Err(DeploymentNotFound),
            ),
            (
                "POST",
                "/openai/deployments/gpt-5/chat/completions",
                None,
                Err(DeploymentNotFound),
            ),
            (
                "GET",
                "/openai/v1/models/gpt-5",
                None,
                Ok("model gpt-5".into()),
            ),
            (
                "POST",
                "/openai/v1/audio/transcriptions",
                Some("gpt-4o"),
                Ok("gpt-4o AsSent(\"/openai/v1/audio/transcriptions\")".into()),
            ),
            (
                "POST",
                "/openai/v1/images/generations",
                None,
                Err(InvalidRequestBody),
            ),
            (
                "POST",
                "/openai/files",
                Some("gpt-4o"),
                Ok("upload gpt-4o /openai/files".into()),
            ),
            (
                "POST",
                "/openai/files",
                Some("gpt-5"),
                Err(DeploymentNotFound),
            ),
            ("POST", "/openai/v1/files", None, Err(DeploymentNotAllowed)),
            (
                "POST",
                "/openai/batches",
                None,
                Ok("batch /openai/batches".into()),
            ),
            (
                "GET",
                "/openai/v1/files",
                None,
                Ok("list Files /openai/v1/files".into()),
            ),
            ("PUT", "/openai/files", None, Err(OperationNotSupported)),
            (
                "GET",
                "/openai/v1/responses/resp_1",
                None,
                Ok("resp_1 Retrieve /openai/v1/responses/resp_1".into()),
            ),
            (
                "POST",
                "/openai/responses/resp_1/cancel",
                Some("ignored"),
                Ok("resp_1 Cancel /openai/responses/resp_1/cancel".into()),
            ),
            ("GET", chat, None, Err(OperationNotSupported)),
        ] {
            assert_eq!(
                planned(method, path, model),
                want,
                "{method} {path} {model:?}"
            );
        }
    }

    #[test]
    fn operations_and_early_deployment_labels() {
        let r = classify("POST", "/openai/deployments/gpt-4o/embeddings");
        assert_eq!(operation(&r).unwrap().0, Operation::Embeddings);
        assert_eq!(named_deployment(&r, lookup).as_deref(), Some("gpt-4o"));
        let r = classify("POST", "/openai/deployments/unknown/embeddings");
        assert_eq!(named_deployment(&r, lookup), None);
        let r = classify("POST", "/openai/fine_tuning/jobs");
        assert_eq!(
            operation(&r).unwrap_err().code,
            ErrorCode::OperationNotSupported
        );
        assert_eq!(
            operation(&classify("GET", "/openai/v1/models")).unwrap().0,
            Operation::ModelsRead
        );
        assert_eq!(
            operation(&classify("GET", "/openai/models/gpt-4o"))
                .unwrap()
                .0,
            Operation::ModelsRead
        );
        assert_eq!(
            operation(&classify("POST", "/openai/v1/audio/speech")).unwrap(),
            (Operation::Audio, "/audio/speech")
        );
    }
}
