//! The JSONL input file of a batch (`purpose=batch`, SPEC §11): every line is a request whose
//! `body.model` names the deployment; the gateway checks that every line names the same one
//! and rewrites it to the member's deployment name before the file goes to that member.

use serde_json::Value;

/// The one deployment every line of `file` names in `body.model`.
pub fn model_of(file: &[u8]) -> Result<String, &'static str> {
    let mut model: Option<String> = None;
    for line in lines(file) {
        let (_, m) = parse_line(line)?;
        match &model {
            Some(first) if *first != m => return Err("the lines name different deployments"),
            Some(_) => {}
            None => model = Some(m),
        }
    }
    model.ok_or("the file has no lines")
}

/// One non-blank line: the request, and the deployment its `body.model` names.
pub fn parse_line(line: &[u8]) -> Result<(Value, String), &'static str> {
    let v: Value = serde_json::from_slice(line).map_err(|_| "a line is not valid JSON")?;
    let m = v
        .get("body")
        .and_then(|b| b.get("model"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or("a line has no `body.model`")?
        .to_string();
    Ok((v, m))
}

/// A line whose text is blank (dropped from the file that goes upstream).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Checks one line (`\n` and `\r` stripped) against the file's deployment `model` and
/// appends it, with `body.model` set to `upstream` and a newline, to `out`.
pub fn rewrite_line(
    line: &[u8],
    model: &str,
    upstream: &str,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let (mut v, m) = parse_line(line)?;
    if m != model {
        return Err("the lines name different deployments");
    }
    if let Some(body) = v.get_mut("body").and_then(Value::as_object_mut) {
        body.insert("model".into(), Value::String(upstream.to_string()));
    }
    serde_json::to_writer(&mut *out, &v).map_err(|_| "a line cannot be written")?;
    out.push(b'\n');
    Ok(())
}

/// `file` with every line's `body.model` set to `upstream` (lines already checked by
/// [`model_of`]; blank lines are dropped, every line ends with a newline).
pub fn rewrite(file: &[u8], upstream: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len() + 64);
    for line in lines(file) {
        let Ok(mut v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if let Some(body) = v.get_mut("body").and_then(Value::as_object_mut) {
            body.insert("model".into(), Value::String(upstream.to_string()));
        }
        if serde_json::to_writer(&mut out, &v).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// The non-blank lines (`\n` or `\r\n` ended).
fn lines(file: &[u8]) -> impl Iterator<Item = &[u8]> {
    file.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_deployment_per_file() {
        let line = |m: &str| {
            format!(
                r#"{{"custom_id":"x","method":"POST","url":"/chat/completions","body":{{"model":"{m}","messages":[]}}}}"#
            )
        };
        let two = format!("{}\n{}\n", line("gpt-4o"), line("gpt-4o"));
        assert_eq!(model_of(two.as_bytes()), Ok("gpt-4o".into()));
        let crlf = format!("{}\r\n\r\n{}", line("a"), line("a"));
        assert_eq!(model_of(crlf.as_bytes()), Ok("a".into()));
        for bad in [
            format!("{}\n{}\n", line("gpt-4o"), line("o3")),
            format!("{}\nnot json\n", line("a")),
            r#"{"body":{"messages":[]}}"#.to_string(),
            r#"{"body":{"model":5}}"#.to_string(),
            r#"{"body":{"model":""}}"#.to_string(),
            r#"{"model":"a"}"#.to_string(),
            "\n\n".to_string(),
        ] {
            assert!(model_of(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_line_is_rewritten() {
        let file = b"{\"custom_id\":\"1\",\"body\":{\"model\":\"d\",\"n\":1}}\n\n{\"custom_id\":\"2\",\"body\":{\"model\":\"d\"}}";
        let out = rewrite(file, "gpt-4o-2024-08-06");
        let lines: Vec<Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (l, id) in lines.iter().zip(["1", "2"]) {
            assert_eq!(l["body"]["model"], "gpt-4o-2024-08-06");
            assert_eq!(l["custom_id"], id);
        }
        assert_eq!(lines[0]["body"]["n"], 1);
        assert!(out.ends_with(b"\n"));
        assert_eq!(model_of(&out), Ok("gpt-4o-2024-08-06".into()));
    }
}
