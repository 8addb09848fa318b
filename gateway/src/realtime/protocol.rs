//! The decisions of a realtime session as pure functions over plain data, each with its
//! table test below: is the upgrade request a valid WebSocket opening (RFC 6455 §4.2.1),
//! which deployment it names and the query the member gets, what a text message is (only
//! `response.create` from the client and `response.done` from the server matter), the usage
//! a `response.done` reports, and the `error` event that answers a refused `response.create`.

use serde::Deserialize;

/// Why an upgrade request is not a WebSocket opening the gateway can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeError {
    NotGet,
    NotHttp11,
    NoUpgradeWebsocket,
    NoConnectionUpgrade,
    BadVersion,
    BadKey,
    /// A body (its bytes would be read as WebSocket frames).
    Body,
}

impl UpgradeError {
    pub fn message(self) -> &'static str {
        match self {
            UpgradeError::NotGet => "A realtime session is opened with GET.",
            UpgradeError::NotHttp11 => {
                "A realtime session needs an HTTP/1.1 WebSocket upgrade (HTTP/2 extended CONNECT is not served)."
            }
            UpgradeError::NoUpgradeWebsocket => "A realtime session needs `Upgrade: websocket`.",
            UpgradeError::NoConnectionUpgrade => {
                "A realtime session needs `Connection: Upgrade`."
            }
            UpgradeError::BadVersion => "Only WebSocket version 13 is served.",
            UpgradeError::BadKey => "`Sec-WebSocket-Key` must be 16 bytes in base64, once.",
            UpgradeError::Body => "A realtime opening carries no body.",
        }
    }
}

/// What the opening handshake carries, as read from the head.
#[derive(Debug, Clone, Default)]
pub struct Opening<'a> {
    pub method: &'a str,
    pub minor: u8,
    /// Every `Upgrade` field line.
    pub upgrade: Vec<&'a str>,
    /// Every `Connection` field line.
    pub connection: Vec<&'a str>,
    /// Every `Sec-WebSocket-Version` field line.
    pub version: Vec<&'a str>,
    /// Every `Sec-WebSocket-Key` field line.
    pub key: Vec<&'a str>,
    /// The request declares a body (`Transfer-Encoding`, or a `Content-Length` other than 0).
    pub body: bool,
}

fn has_token(lines: &[&str], token: &str) -> bool {
    lines
        .iter()
        .flat_map(|l| l.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The client's key when the opening is valid: GET, HTTP/1.1, `Upgrade` naming `websocket`,
/// `Connection` naming `upgrade`, version 13, and exactly one key of 16 bytes in base64.
pub fn check_opening<'a>(o: &Opening<'a>) -> Result<&'a str, UpgradeError> {
    if o.method != "GET" {
        return Err(UpgradeError::NotGet);
    }
    if o.minor != 1 {
        return Err(UpgradeError::NotHttp11);
    }
    if o.body {
        return Err(UpgradeError::Body);
    }
    if !has_token(&o.upgrade, "websocket") {
        return Err(UpgradeError::NoUpgradeWebsocket);
    }
    if !has_token(&o.connection, "upgrade") {
        return Err(UpgradeError::NoConnectionUpgrade);
    }
    if o.version.len() != 1 || o.version[0].trim() != "13" {
        return Err(UpgradeError::BadVersion);
    }
    let [key] = o.key[..] else {
        return Err(UpgradeError::BadKey);
    };
    let key = key.trim();
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => Ok(key),
        _ => Err(UpgradeError::BadKey),
    }
}

/// The `101` answer to a valid opening (`accept`: the key's `Sec-WebSocket-Accept`).
pub fn switching_protocols(accept: &str, request_id: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\nx-request-id: {request_id}\r\n\r\n"
    )
}

/// The query parameter that names the deployment: `deployment` on `/openai/realtime`,
/// `model` on `/openai/v1/realtime`.
pub fn deployment_param(v1: bool) -> &'static str {
    if v1 {
        "model"
    } else {
        "deployment"
    }
}

/// The value of the (single) query parameter `name`; `None` when it is absent, repeated,
/// empty or percent-encoded (no configured deployment name needs encoding).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    let mut found = None;
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                return None;
            }
            found = Some(v);
        }
    }
    found.filter(|v| !v.is_empty() && !v.contains(['%', '+']))
}

/// The query the member gets: the client's, with the deployment parameter set to the
/// member's deployment name and any `api-key` parameter (a client credential) removed.
pub fn upstream_query(query: Option<&str>, param: &str, member_deployment: &str) -> String {
    let mut out = String::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if key.eq_ignore_ascii_case("api-key") {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        if key == param {
            out.push_str(param);
            out.push('=');
            out.push_str(member_deployment);
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// The kinds of text messages the gateway looks into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client's `response.create`: admitted against the client's limits first.
    ResponseCreate,
    /// A server's `response.done`: its usage is charged.
    ResponseDone,
    Other,
}

#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    event_id: Option<std::borrow::Cow<'a, str>>,
}

/// What a text message is. A message is parsed only when its bytes hold the quoted type
/// name (a JSON string that merely contains it has its quotes escaped), so audio and text
/// deltas cost one substring search.
pub fn kind_of(text: &str, from_client: bool) -> Kind {
    let (quoted, kind) = if from_client {
        ("\"response.create\"", Kind::ResponseCreate)
    } else {
        ("\"response.done\"", Kind::ResponseDone)
    };
    if memchr::memmem::find(text.as_bytes(), quoted.as_bytes()).is_none() {
        return Kind::Other;
    }
    let name = &quoted[1..quoted.len() - 1];
    match serde_json::from_str::<Typed<'_>>(text) {
        Ok(t) if t.kind == name => kind,
        _ => Kind::Other,
    }
}

/// The `event_id` of a client event, to name it in the error that refuses it.
pub fn event_id(text: &str) -> Option<String> {
    serde_json::from_str::<Typed<'_>>(text)
        .ok()
        .and_then(|t| t.event_id.map(|e| e.into_owned()))
}

/// The usage of one `response.done` (SPEC §12, with §13's details).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealtimeUsage {
    pub input: u64,
    pub output: u64,
    pub total: u64,
    pub cached_input: u64,
    pub audio_input: u64,
    pub audio_output: u64,
}

impl RealtimeUsage {
    pub fn add(&mut self, u: &RealtimeUsage) {
        self.input += u.input;
        self.output += u.output;
        self.total += u.total;
        self.cached_input += u.cached_input;
        self.audio_input += u.audio_input;
        self.audio_output += u.audio_output;
    }
}

#[derive(Deserialize)]
struct Done {
    response: DoneResponse,
}

#[derive(Deserialize)]
struct DoneResponse {
    #[serde(default)]
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
struct UsageJson {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    input_token_details: Option<InputDetails>,
    #[serde(default)]
    output_token_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    audio_tokens: u64,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default)]
    audio_tokens: u64,
}

/// The usage a `response.done` event reports (`None`: it reports none, e.g. a cancelled
/// response before any token, or it is not one).
pub fn done_usage(text: &str) -> Option<RealtimeUsage> {
    let u = serde_json::from_str::<Done>(text).ok()?.response.usage?;
    let input = u.input_token_details.unwrap_or(InputDetails {
        cached_tokens: 0,
        audio_tokens: 0,
    });
    let output = u
        .output_token_details
        .unwrap_or(OutputDetails { audio_tokens: 0 });
    Some(RealtimeUsage {
        input: u.input_tokens,
        output: u.output_tokens,
        total: u
            .total_tokens
            .unwrap_or(u.input_tokens.saturating_add(u.output_tokens)),
        cached_input: input.cached_tokens,
        audio_input: input.audio_tokens,
        audio_output: output.audio_tokens,
    })
}

/// The `error` event that answers a `response.create` refused by a limit; the session stays
/// open. `retry_after_ms`: when the client's limits will take it again.
pub fn rate_limit_event(
    event_id: Option<&str>,
    retry_after_ms: Option<u64>,
    quota: bool,
) -> String {
    let wait = retry_after_ms.map_or(String::new(), |ms| {
        format!(" Try again in {}.", seconds(ms))
    });
    let message = if quota {
        format!("The client's daily token quota is used up; this response was not created.{wait}")
    } else {
        format!("The client's rate limit is exceeded; this response was not created.{wait}")
    };
    serde_json::json!({
        "type": "error",
        "event_id": format!("event_gw_{}", rand::random::<u64>()),
        "error": {
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "message": message,
            "param": null,
            "event_id": event_id,
            "retry_after_ms": retry_after_ms,
        }
    })
    .to_string()
}

fn seconds(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms.div_ceil(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn opening() -> Opening<'static> {
        Opening {
            method: "GET",
            minor: 1,
            upgrade: vec!["websocket"],
            connection: vec!["Upgrade"],
            version: vec!["13"],
            key: vec![KEY],
            body: false,
        }
    }

    #[test]
    fn openings() {
        use UpgradeError::*;
        type Edit = fn(&mut Opening<'static>);
        let cases: &[(&str, Edit, Result<&str, UpgradeError>)] = &[
            ("valid", |_| {}, Ok(KEY)),
            (
                "tokens in lists, any case",
                |o| {
                    o.upgrade = vec!["h2c, WebSocket"];
                    o.connection = vec!["keep-alive", "foo, UPGRADE"];
                },
                Ok(KEY),
            ),
            ("POST", |o| o.method = "POST", Err(NotGet)),
            ("HTTP/1.0", |o| o.minor = 0, Err(NotHttp11)),
            ("a body", |o| o.body = true, Err(Body)),
            (
                "no upgrade",
                |o| o.upgrade = vec![],
                Err(NoUpgradeWebsocket),
            ),
            (
                "another protocol",
                |o| o.upgrade = vec!["h2c"],
                Err(NoUpgradeWebsocket),
            ),
            (
                "a token's prefix only",
                |o| o.upgrade = vec!["websockets"],
                Err(NoUpgradeWebsocket),
            ),
            (
                "no connection upgrade",
                |o| o.connection = vec!["keep-alive"],
                Err(NoConnectionUpgrade),
            ),
            ("version 8", |o| o.version = vec!["8"], Err(BadVersion)),
            (
                "two versions",
                |o| o.version = vec!["13", "13"],
                Err(BadVersion),
            ),
            ("no version", |o| o.version = vec![], Err(BadVersion)),
            ("no key", |o| o.key = vec![], Err(BadKey)),
            ("two keys", |o| o.key = vec![KEY, KEY], Err(BadKey)),
            ("not base64", |o| o.key = vec!["not a key!"], Err(BadKey)),
            (
                "15 bytes",
                |o| o.key = vec!["AAAAAAAAAAAAAAAAAAAA"],
                Err(BadKey),
            ),
        ];
        for (name, edit, want) in cases {
            let mut o = opening();
            edit(&mut o);
            assert_eq!(check_opening(&o), *want, "{name}");
        }
    }

    #[test]
    fn the_101_carries_rfc_6455s_accept_value() {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(KEY.as_bytes());
        // RFC 6455 §1.3's example.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let head = switching_protocols(&accept, "r1");
        assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(head.contains("\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn deployment_in_the_query() {
        for (query, name, want) in [
            (
                Some("api-version=2024-10-01-preview&deployment=gpt-4o-rt"),
                "deployment",
                Some("gpt-4o-rt"),
            ),
            (Some("model=gpt-4o-rt"), "model", Some("gpt-4o-rt")),
            (Some("model=gpt-4o-rt"), "deployment", None),
            (Some("deployment=a&deployment=b"), "deployment", None),
            (Some("deployment="), "deployment", None),
            (Some("deployment=gpt%2D4o"), "deployment", None),
            (Some("deployments=x"), "deployment", None),
            (None, "deployment", None),
        ] {
            assert_eq!(query_param(query, name), want, "{query:?} {name}");
        }
    }

    #[test]
    fn the_member_gets_its_own_deployment_and_no_client_key() {
        for (query, param, want) in [
            (
                Some("api-version=2024-10-01-preview&deployment=gpt-4o-rt"),
                "deployment",
                "api-version=2024-10-01-preview&deployment=rt-east",
            ),
            (Some("model=gpt-4o-rt"), "model", "model=rt-east"),
            (
                Some("api-key=agw_secret&deployment=gpt-4o-rt&x=1"),
                "deployment",
                "deployment=rt-east&x=1",
            ),
            (Some("Api-Key=k&&model=m"), "model", "model=rt-east"),
        ] {
            assert_eq!(upstream_query(query, param, "rt-east"), want, "{query:?}");
        }
    }

    #[test]
    fn kinds() {
        for (text, from_client, want) in [
            (r#"{"type":"response.create"}"#, true, Kind::ResponseCreate),
            (
                r#"{"event_id":"e1","type":"response.create","response":{}}"#,
                true,
                Kind::ResponseCreate,
            ),
            (
                r#"{"type":"response.done","response":{}}"#,
                false,
                Kind::ResponseDone,
            ),
            // The other side's type does not count.
            (r#"{"type":"response.done"}"#, true, Kind::Other),
            (r#"{"type":"response.create"}"#, false, Kind::Other),
            // Named inside a string or another field: not the type.
            (
                r#"{"type":"conversation.item.create","item":{"text":"\"response.create\""}}"#,
                true,
                Kind::Other,
            ),
            (
                r#"{"type":"session.update","note":"response.create"}"#,
                true,
                Kind::Other,
            ),
            (
                r#"{"type":"x","name":"response.create"}"#,
                true,
                Kind::Other,
            ),
            (r#"{"type":"response.created"}"#, false, Kind::Other),
            ("not json \"response.done\"", false, Kind::Other),
            (
                r#"{"type":"input_audio_buffer.append","audio":"AAAA"}"#,
                true,
                Kind::Other,
            ),
        ] {
            assert_eq!(kind_of(text, from_client), want, "{text}");
        }
    }

    #[test]
    fn usage_of_response_done() {
        let full = r#"{"type":"response.done","event_id":"e","response":{"id":"r","status":"completed","usage":{"total_tokens":253,"input_tokens":127,"output_tokens":126,"input_token_details":{"cached_tokens":64,"text_tokens":63,"audio_tokens":64,"cached_tokens_details":{"text_tokens":0,"audio_tokens":64}},"output_token_details":{"text_tokens":30,"audio_tokens":96}}}}"#;
        assert_eq!(
            done_usage(full),
            Some(RealtimeUsage {
                input: 127,
                output: 126,
                total: 253,
                cached_input: 64,
                audio_input: 64,
                audio_output: 96,
            })
        );
        let bare =
            r#"{"type":"response.done","response":{"usage":{"input_tokens":5,"output_tokens":7}}}"#;
        assert_eq!(
            done_usage(bare),
            Some(RealtimeUsage {
                input: 5,
                output: 7,
                total: 12,
                ..Default::default()
            })
        );
        for none in [
            r#"{"type":"response.done","response":{"status":"cancelled","usage":null}}"#,
            r#"{"type":"response.done","response":{}}"#,
            r#"{"type":"response.done"}"#,
            r#"{"type":"response.done","response":{"usage":{"input_tokens":-1}}}"#,
            "{",
        ] {
            assert_eq!(done_usage(none), None, "{none}");
        }
        let mut sum = RealtimeUsage::default();
        sum.add(&done_usage(full).unwrap());
        sum.add(&done_usage(bare).unwrap());
        assert_eq!(
            (sum.input, sum.output, sum.total, sum.audio_output),
            (132, 133, 265, 96)
        );
    }

    #[test]
    fn the_refusal_is_an_error_event_with_the_openai_code() {
        let e: serde_json::Value =
            serde_json::from_str(&rate_limit_event(Some("evt_1"), Some(1500), false)).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["code"], "rate_limit_exceeded");
        assert_eq!(e["error"]["type"], "rate_limit_error");
        assert_eq!(e["error"]["event_id"], "evt_1");
        assert_eq!(e["error"]["retry_after_ms"], 1500);
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Try again in 2 s."));
        let q: serde_json::Value =
            serde_json::from_str(&rate_limit_event(None, None, true)).unwrap();
        assert_eq!(q["error"]["code"], "rate_limit_exceeded");
        assert!(q["error"]["message"].as_str().unwrap().contains("quota"));
        assert_eq!(
            event_id(r#"{"type":"response.create","event_id":"abc"}"#).as_deref(),
            Some("abc")
        );
    }
}
