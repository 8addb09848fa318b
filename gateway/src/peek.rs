//! The few top-level fields of a JSON request body the gateway routes on (`model`,
//! `stream`, `stream_options.include_usage`).
//!
//! [`top_level`] reads them in one validating pass with the small reader of
//! [`filters::json`], which accepts a strict subset of JSON and answers "not sure" for the
//! rest; here also for a key written with escapes, a repeated routing field and an escaped
//! `model`. [`by_serde`] reads everything else — and refuses what is not JSON.
//!
//! Both refuse text that is not UTF-8 (RFC 8259 §8.1), also inside strings that nothing
//! reads: the fast reader checks it when it saw a byte above ASCII, and [`by_serde`] before
//! serde sees the text, because serde skips the strings of fields it ignores
//! (`IgnoredAny`) without checking them.

use std::borrow::Cow;

use filters::json::{first_time, Reader};
use serde_json::Value;

/// What was found at the top level of a body that is a JSON object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Peeked<'a> {
    /// `model`, when it is a string.
    pub model: Option<Cow<'a, str>>,
    /// `stream`, when it is `true` or `false`.
    pub stream: Option<bool>,
    /// `stream_options.include_usage`, when it is `true` or `false`.
    pub include_usage: Option<bool>,
}

/// The fields of `body`; `None` when it is not a JSON object serde accepts.
pub fn read(body: &[u8]) -> Option<Peeked<'_>> {
    top_level(body).or_else(|| by_serde(body))
}

/// The fast reader; `None`: not sure, ask serde.
pub fn top_level(body: &[u8]) -> Option<Peeked<'_>> {
    let mut r = Reader::new(body);
    r.ws();
    if r.peek()? != b'{' {
        return None;
    }
    let mut out = Peeked::default();
    let (mut model, mut stream, mut options) = (false, false, false);
    r.members(|r, key| {
        match key {
            b"model" => {
                first_time(&mut model)?;
                if r.peek()? == b'"' {
                    let s = r.plain_string()?;
                    out.model = Some(Cow::Borrowed(std::str::from_utf8(s).ok()?));
                } else {
                    r.value(1)?;
                }
            }
            b"stream" => {
                first_time(&mut stream)?;
                out.stream = r.value(1)?;
            }
            b"stream_options" => {
                first_time(&mut options)?;
                if r.peek()? == b'{' {
                    let mut seen = false;
                    r.members(|r, key| {
                        let v = r.value(2)?;
                        if key == b"include_usage" {
                            first_time(&mut seen)?;
                            out.include_usage = v;
                        }
                        Some(())
                    })?;
                } else {
                    r.value(1)?;
                }
            }
            _ => {
                r.value(1)?;
            }
        }
        Some(())
    })?;
    r.end()?;
    Some(out)
}

/// The same fields by serde; `None` when the body is not JSON (or not an object).
pub fn by_serde(body: &[u8]) -> Option<Peeked<'static>> {
    #[derive(serde::Deserialize)]
    struct Fields {
        #[serde(default)]
        model: Option<Value>,
        #[serde(default)]
        stream: Option<Value>,
        #[serde(default)]
        stream_options: Option<Value>,
    }
    // serde_json checks UTF-8 only in the strings it reads, not in those of ignored fields:
    // the whole text is checked first (ASCII at word speed; this is the rare path anyway).
    let text = std::str::from_utf8(body).ok()?;
    let f: Fields = serde_json::from_str(text).ok()?;
    Some(Peeked {
        model: f.model.and_then(|m| match m {
            Value::String(s) => Some(Cow::Owned(s)),
            _ => None,
        }),
        stream: f.stream.and_then(|v| v.as_bool()),
        include_usage: f
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the reader accepts, serde accepts with the same fields.
    fn agrees(body: &[u8]) -> bool {
        let Some(ours) = top_level(body) else {
            return true;
        };
        assert_eq!(
            by_serde(body),
            Some(ours),
            "{}",
            String::from_utf8_lossy(body)
        );
        true
    }

    /// A text that is not UTF-8 is not JSON: neither reader accepts it.
    fn utf8_or_refused(body: &[u8]) -> bool {
        if std::str::from_utf8(body).is_ok() {
            return true;
        }
        assert_eq!(top_level(body), None, "{}", String::from_utf8_lossy(body));
        assert_eq!(by_serde(body), None, "{}", String::from_utf8_lossy(body));
        assert_eq!(read(body), None);
        true
    }

    const READ: &[&str] = &[
        r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}"#,
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
        r#" { "model" : "x" , "stream" : false , "stream_options" : { } } "#,
        r#"{"stream":true,"stream_options":{"include_usage":false,"other":[1,2]}}"#,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"line one\\nline \\\"two\\\" \\u00e9 \\/ \\t\"}]}",
        r#"{"messages":[{"content":"日本語のテキスト, émojis 🙂"}],"temperature":0.7,"top_p":1,"n":-1,"x":null}"#,
        r#"{"a":{"b":{"c":[[],{},[{}],"",0,-0,0.5,-12.25]}},"stream":"yes","model":5}"#,
        r#"{"input":"text","model":"","stream":null,"stream_options":null}"#,
        "{}",
        " {\t}\r\n",
    ];

    #[test]
    fn usual_bodies_are_read_without_serde_and_agree_with_it() {
        for body in READ {
            assert!(top_level(body.as_bytes()).is_some(), "{body}");
            assert!(agrees(body.as_bytes()));
        }
        let p = top_level(READ[1].as_bytes()).unwrap();
        assert_eq!(
            p,
            Peeked {
                model: Some(Cow::Borrowed("gpt-4o")),
                stream: Some(true),
                include_usage: Some(true)
            }
        );
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"stream":true,"stream":false}"#,
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            r#"{"mod\u0065l":"x"}"#,
            r#"{"model":"gpt\u002d4o"}"#,
            r#"{"n":1e5}"#,
            r#"{"n":12345678901234567890}"#,
            r#"{"s":"\ud83d\ude00"}"#,
            r#"{"s":"\ud83d"}"#,
            "{\"s\":\"tab\there\"}",
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":.5}"#,
            r#"{"a":1.}"#,
            r#"{"a":+1}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            r#"{"a":"\u+123"}"#,
            r#"{"a":tru}"#,
            r#"{"a":1} x"#,
            r#"{"a":1}{}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":"unterminated}"#,
            r#"["not","an","object"]"#,
            "",
            "{",
        ] {
            assert_eq!(top_level(body.as_bytes()), None, "{body}");
        }
        assert_eq!(top_level(b"{\"a\":\"\xff\"}"), None, "invalid UTF-8");
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(150), "]".repeat(150));
        assert_eq!(top_level(deep.as_bytes()), None);
        let fine = format!("{{\"a\":{}1{}}}", "[".repeat(50), "]".repeat(50));
        assert!(top_level(fine.as_bytes()).is_some());
    }

    #[test]
    fn invalid_utf8_in_any_string_is_refused_by_both_readers() {
        // Where nothing reads the string (serde ignores the field), where the fast reader is
        // sure and where it leaves the body to serde (an exponent, an escaped key elsewhere).
        for (before, after) in [
            (r#"{"model":"gpt-4o","messages":""#, r#""}"#),
            (r#"{"messages":[{"role":"user","content":""#, r#""}]}"#),
            (r#"{"model":"gpt-4o","input":[""#, r#"",1e5]}"#),
            (r#"{"mod\u0065l":"m","messages":[{"content":""#, r#""}]}"#),
            (r#"{"model":""#, r#""}"#),
            (r#"{"stream_options":{"x":""#, r#""},"stream":true}"#),
            (r#"{""#, r#"":1}"#),
            (r#"{"a":"\u00e9"#, r#"\n"}"#),
        ] {
            for bad in [
                &b"\xff\xfe"[..],
                b"\xff",
                b"\x80",
                b"\xc3",
                b"\xc3(",
                b"\xe6\x97",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\xc0\xaf",
                b"ok \xf0\x9f\x99 ok",
            ] {
                let body = [before.as_bytes(), bad, after.as_bytes()].concat();
                assert!(utf8_or_refused(&body));
            }
            // The same bodies with valid characters above ASCII are read, the same by both.
            let body = [
                before.as_bytes(),
                "Grüße, 日本 🙂".as_bytes(),
                after.as_bytes(),
            ]
            .concat();
            assert!(read(&body).is_some(), "{}", String::from_utf8_lossy(&body));
            assert!(agrees(&body));
        }
    }

    #[test]
    fn mutated_bodies_are_never_accepted_when_serde_refuses_them() {
        // Every single-byte change of the usual bodies (to a set of JSON-significant bytes):
        // what the reader accepts, serde accepts with the same fields.
        // Bytes above ASCII too: a lead byte without its continuation, a stray continuation,
        // a byte never in UTF-8 (and any change inside a multi-byte character of the bodies).
        let alphabet = b"{}[]\",:\\ -0123456789.eE+tfnul\n\x01x\xc3\x80\xff";
        let mut accepted = 0;
        for body in READ {
            let body = body.as_bytes();
            for i in 0..body.len() {
                for &c in alphabet {
                    let mut m = body.to_vec();
                    m[i] = c;
                    if top_level(&m).is_some() {
                        accepted += 1;
                    }
                    assert!(agrees(&m));
                    assert!(utf8_or_refused(&m));
                    // And with the byte removed.
                    let mut d = body.to_vec();
                    d.remove(i);
                    assert!(agrees(&d));
                    assert!(utf8_or_refused(&d));
                }
            }
        }
        assert!(accepted > 1000, "the mutations exercise the accepting path");
    }
}
