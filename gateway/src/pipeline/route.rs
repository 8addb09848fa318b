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
    /// `/openai/v1/...` and `/openai/responses`: the body's `model` (a JSON member, or the
    /// multipart form field of an upload).
    InBody {
        operation: Operation,
        /// The path after `/openai/v1` (`/audio/transcriptions`), for the body's rules.
        rest: &'static str,
    },
    /// A stored object named in the path (SPEC §11): `/openai/v1/responses/{id}`, …
    Stored {
        operation: Operation,
        id: &'a str,
        action: ObjectAction,
    },
    /// `POST /openai/files`, `/openai/v1/files`: a file upload (SPEC §11).
    Upload,
    /// `POST /openai/batches`, `/openai/v1/batches`: a new batch on an uploaded file.
    CreateBatch,
    /// `GET /openai/files`, `/openai/batches` (and under `/openai/v1`): the caller's own,
    /// gathered by the gateway.
    List {
        operation: Operation,
    },
    /// Answered by the gateway itself.
    Models,
    /// `GET /openai/models/{id}`, `/openai/v1/models/{id}`: answered by the gateway itself.
    Model {
        id: &'a str,
    },
    /// A realtime WebSocket session (SPEC §12); the deployment is in the query
    /// (`deployment=`, or `model=` on `/openai/v1/realtime`).
    Realtime {
        v1: bool,
    },
    NotSupported,
}

/// What a request does to a stored object named in its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectAction {
    /// `GET …/{id}` (a response: also resumed as a stream with `?stream=true`).
    Retrieve,
    /// `DELETE …/{id}`: the record goes too.
    Delete,
    /// `POST …/{id}/cancel`
    Cancel,
    /// `GET …/{id}/input_items`
    InputItems,
    /// `GET /openai/files/{id}/content`
    Content,
}

/// An object id as Azure makes them (`resp_…`): letters, digits, `_` and `-`, at most 256.
pub fn object_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `/openai/v1/responses/{id}[/action]` and `/openai/responses/{id}[/action]`.
fn stored_response<'a>(method: &str, path: &'a str) -> Option<Route<'a>> {
    let rest = path
        .strip_prefix("/openai/v1/responses/")
        .or_else(|| path.strip_prefix("/openai/responses/"))?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    if !object_id(id) {
        return None;
    }
    let action = match (method, tail) {
        ("GET", None) => ObjectAction::Retrieve,
        ("DELETE", None) => ObjectAction::Delete,
        ("POST", Some("cancel")) => ObjectAction::Cancel,
        ("GET", Some("input_items")) => ObjectAction::InputItems,
        _ => return None,
    };
    Some(Route::Stored {
        operation: Operation::Responses,
        id,
        action,
    })
}

/// `/openai/files…` and `/openai/batches…` (also under `/openai/v1/`); `None` for other paths.
fn files_or_batches<'a>(method: &str, path: &'a str) -> Option<Route<'a>> {
    let rest = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/openai/"))?;
    let (operation, tail) = if let Some(t) = rest.strip_prefix("files") {
        (Operation::Files, t)
    } else {
        (Operation::Batches, rest.strip_prefix("batches")?)
    };
    if tail.is_empty() {
        return Some(match (method, operation) {
            ("POST", Operation::Files) => Route::Upload,
            ("POST", _) => Route::CreateBatch,
            ("GET", _) => Route::List { operation },
            _ => Route::NotSupported,
        });
    }
    let tail = tail.strip_prefix('/')?;
    let (id, action) = match tail.split_once('/') {
        Some((id, a)) => (id, Some(a)),
        None => (tail, None),
    };
    if !object_id(id) {
        return Some(Route::NotSupported);
    }
    let action = match (operation, method, action) {
        (_, "GET", None) => ObjectAction::Retrieve,
        (Operation::Files, "DELETE", None) => ObjectAction::Delete,
        (Operation::Files, "GET", Some("content")) => ObjectAction::Content,
        (Operation::Batches, "POST", Some("cancel")) => ObjectAction::Cancel,
        _ => return Some(Route::NotSupported),
    };
    Some(Route::Stored {
        operation,
        id,
        action,
    })
}

/// An absolute path of non-empty segments, none of them `.` or `..`, with no `%` or `\\`.
/// It runs for every request: a path without a dot (the usual one) is checked eight bytes
/// at a time ([`plain_clean`]); one with a dot segment by segment ([`clean_by_bytes`]).
fn clean(path: &str) -> bool {
    plain_clean(path.as_bytes()).unwrap_or_else(|| clean_by_bytes(path.as_bytes()))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The bytes of `w` equal to `c`, as their high bits: exact for every byte (no borrow or
/// carry crosses bytes).
fn eq_bits(w: u64, c: u8) -> u64 {
    let x = w ^ (ONES * u64::from(c));
    !(((x & LOW7).wrapping_add(LOW7)) | x) & !LOW7
}

/// [`clean`] for a path without `.`: it starts with `/`, holds no `//`, `%` or `\\`, and does
/// not end with `/`. `None`: it has a dot (whether its segments are `.` or `..` is left
/// to [`clean_by_bytes`]).
fn plain_clean(b: &[u8]) -> Option<bool> {
    if b.first() != Some(&b'/') {
        return Some(false);
    }
    // Whether the byte before `i` is a slash.
    let mut slash = true;
    let mut i = 1;
    while let Some(word) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let w = u64::from_le_bytes(w);
        if eq_bits(w, b'.') != 0 {
            return None;
        }
        let s = eq_bits(w, b'/');
        // A slash right after a slash: inside the word, or at its start after the last one.
        if eq_bits(w, b'%') | eq_bits(w, b'\\') != 0
            || s & (s >> 8) != 0
            || (slash && s & 0x80 != 0)
        {
            return Some(false);
        }
        slash = s >> 63 != 0;
        i += 8;
    }
    for &c in &b[i..] {
        match c {
            b'.' => return None,
            b'%' | b'\\' => return Some(false),
            b'/' if slash => return Some(false),
            _ => slash = c == b'/',
        }
    }
    Some(!slash)
}

/// [`clean`] a byte at a time, segment by segment (any path; paths are short: a scalar loop
/// costs less than setting up vectorized searches per segment).
fn clean_by_bytes(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    // The current segment so far: empty, ".", ".." or anything else (which is the only
    // kind a segment may end as).
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Seg {
        Empty,
        Dot,
        DotDot,
        Other,
    }
    let mut seg = Seg::Empty;
    for &b in rest {
        seg = match (b, seg) {
            (b'%' | b'\\', _) => return false,
            (b'/', Seg::Other) => Seg::Empty,
            (b'/', _) => return false,
            (b'.', Seg::Empty) => Seg::Dot,
            (b'.', Seg::Dot) => Seg::DotDot,
            _ => Seg::Other,
        };
    }
    seg == Seg::Other
}

pub fn classify<'a>(method: &str, path: &'a str) -> Route<'a> {
    if !clean(path) {
        return Route::NotSupported;
    }
    let post = method == "POST";
    // The usual request first: no other route below starts with this prefix, so trying it
    // first answers as the full order does (`same_routes_as_the_full_order` checks).
    if post {
        if let Some(after) = path.strip_prefix("/openai/deployments/") {
            return in_path(after);
        }
    }
    if path.starts_with("/openai/v1/responses/") || path.starts_with("/openai/responses/") {
        return stored_response(method, path).unwrap_or(Route::NotSupported);
    }
    if let Some(r) = files_or_batches(method, path) {
        return r;
    }
    if method == "GET" {
        return match path {
            "/openai/deployments" | "/openai/models" | "/openai/v1/models" => Route::Models,
            "/openai/realtime" => Route::Realtime { v1: false },
            "/openai/v1/realtime" => Route::Realtime { v1: true },
            _ => match path
                .strip_prefix("/openai/models/")
                .or_else(|| path.strip_prefix("/openai/v1/models/"))
            {
                Some(id) if !id.contains('/') => Route::Model { id },
                _ => Route::NotSupported,
            },
        };
    }
    if !post {
        return Route::NotSupported;
    }
    let body_op = match path {
        "/openai/v1/chat/completions" => Some((Operation::ChatCompletions, "/chat/completions")),
        "/openai/v1/completions" => Some((Operation::Completions, "/completions")),
        "/openai/v1/embeddings" => Some((Operation::Embeddings, "/embeddings")),
        "/openai/v1/responses" | "/openai/responses" => Some((Operation::Responses, "/responses")),
        "/openai/v1/images/generations" => Some((Operation::Images, "/images/generations")),
        "/openai/v1/images/edits" => Some((Operation::Images, "/images/edits")),
        "/openai/v1/audio/speech" => Some((Operation::Audio, "/audio/speech")),
        "/openai/v1/audio/transcriptions" => Some((Operation::Audio, "/audio/transcriptions")),
        "/openai/v1/audio/translations" => Some((Operation::Audio, "/audio/translations")),
        _ => None,
    };
    if let Some((operation, rest)) = body_op {
        return Route::InBody { operation, rest };
    }
    match path.strip_prefix("/openai/deployments/") {
        Some(after) => in_path(after),
        None => Route::NotSupported,
    }
}

/// `{deployment}/{operation path}`, what follows `/openai/deployments/` in a POST.
fn in_path(after: &str) -> Route<'_> {
    let Some(slash) = memchr::memchr(b'/', after.as_bytes()) else {
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
        for (path, operation, rest) in [
            (
                "/openai/v1/chat/completions",
                Operation::ChatCompletions,
                "/chat/completions",
            ),
            ("/openai/responses", Operation::Responses, "/responses"),
            (
                "/openai/v1/images/generations",
                Operation::Images,
                "/images/generations",
            ),
            (
                "/openai/v1/images/edits",
                Operation::Images,
                "/images/edits",
            ),
            ("/openai/v1/audio/speech", Operation::Audio, "/audio/speech"),
            (
                "/openai/v1/audio/transcriptions",
                Operation::Audio,
                "/audio/transcriptions",
            ),
            (
                "/openai/v1/audio/translations",
                Operation::Audio,
                "/audio/translations",
            ),
        ] {
            assert_eq!(
                classify("POST", path),
                Route::InBody { operation, rest },
                "{path}"
            );
        }
    }

    #[test]
    fn one_model_by_id() {
        assert_eq!(
            classify("GET", "/openai/models/gpt-4o"),
            Route::Model { id: "gpt-4o" }
        );
        assert_eq!(
            classify("GET", "/openai/v1/models/o3-mini"),
            Route::Model { id: "o3-mini" }
        );
        for (m, p) in [
            ("GET", "/openai/models/a/b"),
            ("GET", "/openai/models/"),
            ("DELETE", "/openai/v1/models/gpt-4o"),
            ("POST", "/openai/v1/models/gpt-4o"),
            ("GET", "/openai/v1/models/%2e%2e"),
            ("GET", "/openai/v1/models/.."),
        ] {
            assert_eq!(classify(m, p), Route::NotSupported, "{m} {p}");
        }
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

    /// `classify` as it was before the deployment fast path (session 7): the oracle.
    fn classify_full_order<'a>(method: &str, path: &'a str) -> Route<'a> {
        if !clean(path) {
            return Route::NotSupported;
        }
        if path.starts_with("/openai/v1/responses/") || path.starts_with("/openai/responses/") {
            return stored_response(method, path).unwrap_or(Route::NotSupported);
        }
        if let Some(r) = files_or_batches(method, path) {
            return r;
        }
        if method == "GET" {
            return match path {
                "/openai/deployments" | "/openai/models" | "/openai/v1/models" => Route::Models,
                "/openai/realtime" => Route::Realtime { v1: false },
                "/openai/v1/realtime" => Route::Realtime { v1: true },
                _ => match path
                    .strip_prefix("/openai/models/")
                    .or_else(|| path.strip_prefix("/openai/v1/models/"))
                {
                    Some(id) if !id.contains('/') => Route::Model { id },
                    _ => Route::NotSupported,
                },
            };
        }
        if method != "POST" {
            return Route::NotSupported;
        }
        let body_op = match path {
            "/openai/v1/chat/completions" => {
                Some((Operation::ChatCompletions, "/chat/completions"))
            }
            "/openai/v1/completions" => Some((Operation::Completions, "/completions")),
            "/openai/v1/embeddings" => Some((Operation::Embeddings, "/embeddings")),
            "/openai/v1/responses" | "/openai/responses" => {
                Some((Operation::Responses, "/responses"))
            }
            "/openai/v1/images/generations" => Some((Operation::Images, "/images/generations")),
            "/openai/v1/images/edits" => Some((Operation::Images, "/images/edits")),
            "/openai/v1/audio/speech" => Some((Operation::Audio, "/audio/speech")),
            "/openai/v1/audio/transcriptions" => Some((Operation::Audio, "/audio/transcriptions")),
            "/openai/v1/audio/translations" => Some((Operation::Audio, "/audio/translations")),
            _ => None,
        };
        if let Some((operation, rest)) = body_op {
            return Route::InBody { operation, rest };
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

    #[test]
    fn same_routes_as_the_full_order() {
        // Every prefix a route starts with, followed by every tail, under every method.
        let prefixes = [
            "/openai/deployments/",
            "/openai/deployments",
            "/openai/",
            "/openai/v1/",
            "/openai/v1/responses/",
            "/openai/responses/",
            "/openai/deployments/files/",
            "/openai/deployments/batches/",
            "/openai/deployments/responses/",
        ];
        let tails = [
            "",
            "gpt-4o/chat/completions",
            "gpt-4o/completions",
            "gpt-4o/embeddings",
            "gpt-4o/images/edits",
            "gpt-4o/audio/speech",
            "gpt-4o/chat/completion",
            "gpt-4o",
            "gpt-4o/",
            "/chat/completions",
            "files",
            "files/file-1",
            "batches/b_1/cancel",
            "responses",
            "resp_1/cancel",
            "chat/completions",
            "v1/chat/completions",
            "audio/speech",
            "models",
            "models/m1",
            "realtime",
            "../chat/completions",
            "gpt-4o/./chat/completions",
            "gpt%2F4o/chat/completions",
            "gpt-4o\\x/chat/completions",
            "a//chat/completions",
        ];
        let mut n = 0;
        for m in ["POST", "GET", "DELETE", "PUT", "post"] {
            for p in prefixes {
                for t in tails {
                    let path = format!("{p}{t}");
                    assert_eq!(
                        classify(m, &path),
                        classify_full_order(m, &path),
                        "{m} {path}"
                    );
                    n += 1;
                }
            }
        }
        assert_eq!(n, 5 * prefixes.len() * tails.len());
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
            assert_eq!(clean_by_bytes(p.as_bytes()), by_segments(p), "{p:?}");
        }
        // Longer ones, across the eight-byte words of the dot-free path: every path of up to
        // 17 characters of `/` and `a`, up to 11 of `/`, `a` and `%`, up to 10 of `/`, `a`
        // and `.`, and the usual paths with every byte changed to one that matters.
        let mut checked = 0;
        for (alphabet, max) in [(&b"/a"[..], 17), (b"/a%", 11), (b"/a.", 10), (b"/\\a", 10)] {
            let mut level = vec![Vec::new()];
            for _ in 0..max {
                level = level
                    .iter()
                    .flat_map(|p: &Vec<u8>| alphabet.iter().map(move |&c| [&p[..], &[c]].concat()))
                    .collect();
                for p in &level {
                    let p = std::str::from_utf8(p).unwrap();
                    assert_eq!(clean(p), by_segments(p), "{p:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 400_000);
        for usual in [
            "/openai/deployments/gpt-4o/chat/completions",
            "/openai/v1/chat/completions",
            "/openai/deployments/text-embedding-3-small/embeddings",
        ] {
            for i in 0..usual.len() {
                for c in ['/', '.', '%', '\\', 'x'] {
                    let mut p = usual.to_string();
                    p.replace_range(i..i + 1, &c.to_string());
                    assert_eq!(clean(&p), by_segments(&p), "{p:?}");
                    let mut q = usual.to_string();
                    q.insert(i, c);
                    assert_eq!(clean(&q), by_segments(&q), "{q:?}");
                }
            }
            assert!(clean(usual));
        }
    }

    #[test]
    fn the_byte_comparison_marks_exactly_the_equal_bytes() {
        for c in [b'/', b'.', b'%', b'\\'] {
            for b in 0..=255u8 {
                for at in 0..8 {
                    for other in [0u8, c, c ^ 1, 0x80 | c, 0xff, b'a'] {
                        let mut w = [other; 8];
                        w[at] = b;
                        let want = w
                            .iter()
                            .enumerate()
                            .fold(0u64, |m, (k, &x)| m | (u64::from(x == c) << (8 * k + 7)));
                        assert_eq!(eq_bits(u64::from_le_bytes(w), c), want, "{w:?} {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn stored_response_paths() {
        use ObjectAction::*;
        for (m, p, want) in [
            (
                "GET",
                "/openai/v1/responses/resp_1",
                Some(("resp_1", Retrieve)),
            ),
            (
                "GET",
                "/openai/responses/resp_1",
                Some(("resp_1", Retrieve)),
            ),
            (
                "DELETE",
                "/openai/v1/responses/resp-2",
                Some(("resp-2", Delete)),
            ),
            ("POST", "/openai/v1/responses/r/cancel", Some(("r", Cancel))),
            ("POST", "/openai/responses/r/cancel", Some(("r", Cancel))),
            (
                "GET",
                "/openai/v1/responses/r/input_items",
                Some(("r", InputItems)),
            ),
            (
                "GET",
                "/openai/responses/r/input_items",
                Some(("r", InputItems)),
            ),
            // Wrong method, unknown action, odd ids, deeper paths.
            ("POST", "/openai/v1/responses/r", None),
            ("GET", "/openai/v1/responses/r/cancel", None),
            ("DELETE", "/openai/v1/responses/r/input_items", None),
            ("GET", "/openai/v1/responses/r/other", None),
            ("GET", "/openai/v1/responses/r/input_items/x", None),
            ("GET", "/openai/v1/responses/r.x", None),
            ("GET", "/openai/v1/responses/", None),
            ("GET", "/openai/v1/responses/a%2fb", None),
            ("GET", "/openai/v1/responses/../models", None),
            ("GET", "/openai/deployments/d/responses/r", None),
            ("GET", "/openai/v2/responses/r", None),
        ] {
            let got = match classify(m, p) {
                Route::Stored {
                    operation: Operation::Responses,
                    id,
                    action,
                } => Some((id, action)),
                Route::NotSupported => None,
                other => panic!("{m} {p}: {other:?}"),
            };
            assert_eq!(got, want, "{m} {p}");
        }
        // A deployment may be called `responses`.
        assert!(matches!(
            classify("POST", "/openai/deployments/responses/chat/completions"),
            Route::InPath { .. }
        ));
        let long = format!("/openai/v1/responses/{}", "a".repeat(257));
        assert_eq!(classify("GET", &long), Route::NotSupported);
        // Creating one is still a body-model route.
        assert!(matches!(
            classify("POST", "/openai/v1/responses"),
            Route::InBody { .. }
        ));
    }

    #[test]
    fn files_and_batches_paths() {
        use ObjectAction::*;
        use Operation::{Batches, Files};
        for v in ["/openai", "/openai/v1"] {
            assert_eq!(classify("POST", &format!("{v}/files")), Route::Upload);
            assert_eq!(
                classify("POST", &format!("{v}/batches")),
                Route::CreateBatch
            );
            assert_eq!(
                classify("GET", &format!("{v}/files")),
                Route::List { operation: Files }
            );
            assert_eq!(
                classify("GET", &format!("{v}/batches")),
                Route::List { operation: Batches }
            );
        }
        for (m, p, op, id, action) in [
            ("GET", "/openai/files/file-1", Files, "file-1", Retrieve),
            (
                "GET",
                "/openai/v1/files/file-1/content",
                Files,
                "file-1",
                Content,
            ),
            ("DELETE", "/openai/files/file-1", Files, "file-1", Delete),
            (
                "GET",
                "/openai/batches/batch_1",
                Batches,
                "batch_1",
                Retrieve,
            ),
            ("POST", "/openai/v1/batches/b/cancel", Batches, "b", Cancel),
        ] {
            assert_eq!(
                classify(m, p),
                Route::Stored {
                    operation: op,
                    id,
                    action
                },
                "{m} {p}"
            );
        }
    }

    #[test]
    fn everything_else_is_not_supported() {
        for (m, p) in [
            ("PUT", "/openai/files"),
            ("DELETE", "/openai/batches"),
            ("POST", "/openai/filesx"),
            ("GET", "/openai/files/f/other"),
            ("POST", "/openai/files/f"),
            ("DELETE", "/openai/batches/b"),
            ("GET", "/openai/batches/b/cancel"),
            ("GET", "/openai/files/a.b"),
            ("GET", "/openai/v2/files"),
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
