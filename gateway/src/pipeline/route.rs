//! Which operation a request is, from its method and path (SPEC §4). Anything else is
//! `OperationNotSupported` and reaches no backend; path tricks (dot segments, encoded
//! characters, empty segments, backslashes) never match.

use filters::Operation;

/// Where the deployment name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/openai/deployments/{deployment}/{rest}`
    InPath {
        operation: Operation,
        deployment: &'a str,
        /// The path after the deployment name, e.g. `/chat/completions`.
        rest: &'a str,
    },
    /// `/openai/v1/...` and `/openai/responses`: the body's `model`.
    InBody {
        operation: Operation,
    },
    /// Answered by the gateway itself.
    Models,
    /// A realtime WebSocket session (SPEC §12); the deployment is in the query
    /// (`deployment=`, or `model=` on `/openai/v1/realtime`).
    Realtime {
        v1: bool,
    },
    NotSupported,
}

/// An absolute path of non-empty segments, none of them `.` or `..`, with no `%` or `\\`
/// (it runs for every request: the two bytes are searched for vectorized, segments are
/// found by their slashes).
fn clean(path: &str) -> bool {
    let Some(rest) = path.as_bytes().strip_prefix(b"/") else {
        return false;
    };
    if memchr::memchr2(b'%', b'\\', rest).is_some() {
        return false;
    }
    let mut start = 0;
    for end in memchr::memchr_iter(b'/', rest).chain([rest.len()]) {
        if matches!(&rest[start..end], b"" | b"." | b"..") {
            return false;
        }
        start = end + 1;
    }
    true
}

pub fn classify<'a>(method: &str, path: &'a str) -> Route<'a> {
    if !clean(path) {
        return Route::NotSupported;
    }
    let post = method == "POST";
    if method == "GET" {
        return match path {
            "/openai/deployments" | "/openai/models" | "/openai/v1/models" => Route::Models,
            "/openai/realtime" => Route::Realtime { v1: false },
            "/openai/v1/realtime" => Route::Realtime { v1: true },
            _ => Route::NotSupported,
        };
    }
    if !post {
        return Route::NotSupported;
    }
    let body_op = match path {
        "/openai/v1/chat/completions" => Some(Operation::ChatCompletions),
        "/openai/v1/completions" => Some(Operation::Completions),
        "/openai/v1/embeddings" => Some(Operation::Embeddings),
        "/openai/v1/responses" | "/openai/responses" => Some(Operation::Responses),
        _ => None,
    };
    if let Some(operation) = body_op {
        return Route::InBody { operation };
    }
    let Some(after) = path.strip_prefix("/openai/deployments/") else {
        return Route::NotSupported;
    };
    let Some(slash) = after.find('/') else {
        return Route::NotSupported;
    };
    let (deployment, rest) = after.split_at(slash);
    let operation = match rest {
        "/chat/completions" => Operation::ChatCompletions,
        "/completions" => Operation::Completions,
        "/embeddings" => Operation::Embeddings,
        "/images/generations" | "/images/edits" => Operation::Images,
        "/audio/transcriptions" | "/audio/translations" | "/audio/speech" => Operation::Audio,
        _ => return Route::NotSupported,
    };
    Route::InPath {
        operation,
        deployment,
        rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_paths() {
        assert_eq!(
            classify("POST", "/openai/deployments/gpt-4o/chat/completions"),
            Route::InPath {
                operation: Operation::ChatCompletions,
                deployment: "gpt-4o",
                rest: "/chat/completions"
            }
        );
        assert!(matches!(
            classify("POST", "/openai/deployments/d/audio/speech"),
            Route::InPath {
                operation: Operation::Audio,
                ..
            }
        ));
        assert!(matches!(
            classify("POST", "/openai/deployments/d/images/edits"),
            Route::InPath {
                operation: Operation::Images,
                ..
            }
        ));
    }

    #[test]
    fn body_model_paths() {
        assert_eq!(
            classify("POST", "/openai/v1/chat/completions"),
            Route::InBody {
                operation: Operation::ChatCompletions
            }
        );
        assert_eq!(
            classify("POST", "/openai/responses"),
            Route::InBody {
                operation: Operation::Responses
            }
        );
    }

    #[test]
    fn realtime_is_a_get_on_two_paths() {
        assert_eq!(
            classify("GET", "/openai/realtime"),
            Route::Realtime { v1: false }
        );
        assert_eq!(
            classify("GET", "/openai/v1/realtime"),
            Route::Realtime { v1: true }
        );
        for (m, p) in [
            ("POST", "/openai/realtime"),
            ("GET", "/openai/realtime/"),
            ("GET", "/openai/v1/realtime/sessions"),
            ("GET", "/openai/deployments/d/realtime"),
        ] {
            assert_eq!(classify(m, p), Route::NotSupported, "{m} {p}");
        }
    }

    #[test]
    fn models_are_answered_by_the_gateway() {
        for p in ["/openai/deployments", "/openai/models", "/openai/v1/models"] {
            assert_eq!(classify("GET", p), Route::Models);
        }
    }

    #[test]
    fn clean_paths_are_exactly_those_of_plain_segments() {
        // The definition, one segment at a time.
        fn by_segments(path: &str) -> bool {
            let Some(rest) = path.strip_prefix('/') else {
                return false;
            };
            rest.split('/')
                .all(|seg| !matches!(seg, "" | "." | "..") && !seg.contains(['%', '\\']))
        }
        // Every path of up to seven characters over the bytes that matter.
        let mut paths = vec![String::new()];
        for _ in 0..7 {
            let longer: Vec<String> = paths
                .iter()
                .filter(|p| p.len() == paths.last().map_or(0, String::len))
                .flat_map(|p| ['/', '.', 'a', '%', '\\'].map(|c| format!("{p}{c}")))
                .collect();
            paths.extend(longer);
        }
        assert!(paths.len() > 90_000);
        for p in &paths {
            assert_eq!(clean(p), by_segments(p), "{p:?}");
        }
    }

    #[test]
    fn everything_else_is_not_supported() {
        for (m, p) in [
            ("POST", "/openai/files"),
            ("GET", "/openai/batches"),
            ("POST", "/openai/deployments/x/fine_tuning/jobs"),
            ("POST", "/openai/deployments/../files/chat/completions"),
            ("POST", "/openai/deployments/x/../../files"),
            ("POST", "/openai/deployments/%2e%2e/chat/completions"),
            ("POST", "/openai/deployments//chat/completions"),
            ("POST", "/openai/deployments/x/chat/completions/"),
            ("POST", "/openai/deployments/./chat/completions"),
            ("POST", "/openai/deployments/a\\b/chat/completions"),
            ("GET", "/openai/deployments/x/chat/completions"),
            ("DELETE", "/openai/models"),
            ("POST", "/openai/assistants"),
            ("POST", ""),
        ] {
            assert_eq!(classify(m, p), Route::NotSupported, "{m} {p}");
        }
    }
}
