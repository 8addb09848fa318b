//! From text to file types, reporting every error at once with its YAML path and line.
//!
//! Steps: `${NAME}` substitution (a missing variable is an error at its line); a YAML event
//! scan that maps every path (`clients[0].allow.deployments`) to its line; then each
//! top-level section — and each item of the lists and maps — is deserialized on its own, so
//! one bad client does not hide the errors of the next.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::DeserializeOwned;
use serde_norway::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::file::*;

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path, e.g. `clients[0].allow.deployments[1]`; empty for the whole file.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (Some(l), false) => write!(f, "line {l}: {}: {}", self.path, self.message),
            (Some(l), true) => write!(f, "line {l}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.path, self.message),
            (None, true) => write!(f, "{}", self.message),
        }
    }
}

/// The whole file, as written.
#[derive(Debug)]
pub struct FileConfig {
    pub server: ServerFile,
    pub identity: IdentityFile,
    pub clients: Vec<ClientFile>,
    pub deployments: BTreeMap<String, Vec<MemberFile>>,
    pub backends: Vec<BackendFile>,
    pub upstream_identity: UpstreamIdentityFile,
    pub health_checks: HealthChecksFile,
    pub retries: RetriesFile,
    pub limits: LimitsStoreFile,
    pub state: StateFile,
    pub audit_log: AuditLogFile,
}

/// Maps YAML paths to lines, and collects errors.
pub struct Errors {
    lines: HashMap<String, usize>,
    pub list: Vec<ConfigError>,
}

impl Errors {
    /// Records an error at `path`; its line is that of the deepest known prefix.
    pub fn at(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.line_of(&path);
        self.list.push(ConfigError {
            path,
            line,
            message: message.into(),
        });
    }

    /// The deepest path that starts on `line` (for errors found by line, like `${VAR}`).
    pub fn path_at(&self, line: usize) -> Option<String> {
        self.lines
            .iter()
            .filter(|(_, l)| **l == line)
            .map(|(p, _)| p)
            .max_by_key(|p| (p.len(), p.as_str()))
            .cloned()
    }

    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// Replaces `${NAME}` with the environment variable NAME. Full-line comments are left alone.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> (String, Vec<ConfigError>) {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find('}') {
                Some(end) => {
                    let name = &after[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => errors.push(ConfigError {
                            path: String::new(),
                            line: Some(i + 1),
                            message: format!("environment variable {name} is not set"),
                        }),
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
    }
    (out, errors)
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct LineIndex {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl LineIndex {
    /// Path of the value about to start, if we are at a value position.
    fn value_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Map { path, key: Some(k) }) => Some(join(path, k)),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Seq { path, index }) => Some(format!("{path}[{index}]")),
        }
    }

    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for LineIndex {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, ..) => match self.value_path() {
                Some(p) => {
                    self.lines.entry(p).or_insert(line);
                    self.value_done();
                }
                None => {
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        self.lines.entry(join(path, &value)).or_insert(line);
                        *key = Some(value);
                    }
                }
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let p = self.value_path().unwrap_or_default();
                self.lines.entry(p.clone()).or_insert(line);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path: p, key: None }
                } else {
                    Frame::Seq { path: p, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            Event::Alias(_) => self.value_done(),
            _ => {}
        }
    }
}

fn index_lines(text: &str) -> HashMap<String, usize> {
    let mut idx = LineIndex {
        stack: Vec::new(),
        lines: HashMap::new(),
    };
    let mut parser = Parser::new_from_str(text);
    // Syntax errors are reported by the deserializer below, with their own location.
    let _ = parser.load(&mut idx, false);
    idx.lines
}

fn de<T: DeserializeOwned>(value: Value, path: &str, errs: &mut Errors) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full = match (path.is_empty(), inner.as_str()) {
                (_, ".") => path.to_string(),
                (true, _) => inner.clone(),
                (false, i) if i.starts_with('[') => format!("{path}{i}"),
                (false, i) => format!("{path}.{i}"),
            };
            errs.at(full, clean_message(&e.into_inner().to_string()));
            None
        }
    }
}

/// serde_norway appends " at line X column Y" which points into the sub-document; the
/// path's line is the one users need.
fn clean_message(m: &str) -> String {
    match m.find(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

fn de_list<T: DeserializeOwned>(value: Value, path: &str, errs: &mut Errors) -> Vec<T> {
    match value {
        Value::Sequence(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| de(v, &format!("{path}[{i}]"), errs))
            .collect(),
        Value::Null => Vec::new(),
        _ => {
            errs.at(path, "expected a list");
            Vec::new()
        }
    }
}

/// Parses the text (after `${VAR}` substitution) into file types.
pub fn parse(text: &str) -> Result<FileConfig, Vec<ConfigError>> {
    let (text, env_errors) = substitute_env(text, |n| std::env::var(n).ok());
    let mut errs = Errors {
        lines: index_lines(&text),
        list: Vec::new(),
    };
    for mut e in env_errors {
        e.path = e.line.and_then(|l| errs.path_at(l)).unwrap_or_default();
        errs.list.push(e);
    }
    let root: Value = match serde_norway::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            errs.list.push(ConfigError {
                path: String::new(),
                line: e.location().map(|l| l.line()),
                message: format!("not valid YAML: {}", clean_message(&e.to_string())),
            });
            return Err(errs.list);
        }
    };
    let Value::Mapping(map) = root else {
        errs.at("", "the file must be a YAML mapping");
        return Err(errs.list);
    };
    let mut sections: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in map {
        match k.as_str() {
            Some(
                name @ ("server" | "identity" | "clients" | "deployments" | "backends"
                | "upstream_identity" | "health_checks" | "retries" | "limits" | "state"
                | "audit_log"),
            ) => {
                sections.insert(name.to_string(), v);
            }
            Some(other) => errs.at(other, format!("unknown key `{other}`")),
            None => errs.at("", "top-level keys must be strings"),
        }
    }
    let mut take = |name: &str| sections.remove(name).unwrap_or(Value::Null);
    let server_v = take("server");
    let server = if server_v.is_null() {
        errs.at("server", "missing section `server`");
        None
    } else {
        de::<ServerFile>(server_v, "server", &mut errs)
    };
    let identity = opt_section::<IdentityFile>(take("identity"), "identity", &mut errs);
    let clients = de_list::<ClientFile>(take("clients"), "clients", &mut errs);
    let backends = de_list::<BackendFile>(take("backends"), "backends", &mut errs);
    let mut deployments = BTreeMap::new();
    match take("deployments") {
        Value::Mapping(m) => {
            for (k, v) in m {
                let Some(name) = k.as_str().map(str::to_string) else {
                    errs.at("deployments", "deployment names must be strings");
                    continue;
                };
                let members = de_list::<MemberFile>(v, &format!("deployments.{name}"), &mut errs);
                deployments.insert(name, members);
            }
        }
        Value::Null => {}
        _ => errs.at("deployments", "expected a mapping of deployment names"),
    }
    let upstream_identity = opt_section(take("upstream_identity"), "upstream_identity", &mut errs);
    let health_checks = opt_section(take("health_checks"), "health_checks", &mut errs);
    let retries = opt_section(take("retries"), "retries", &mut errs);
    let limits = opt_section(take("limits"), "limits", &mut errs);
    let state = opt_section(take("state"), "state", &mut errs);
    let audit_log = opt_section(take("audit_log"), "audit_log", &mut errs);

    match (server, errs.list.is_empty()) {
        (Some(server), true) => Ok(FileConfig {
            server,
            identity: identity.unwrap_or_default(),
            clients,
            deployments,
            backends,
            upstream_identity: upstream_identity.unwrap_or_default(),
            health_checks: health_checks.unwrap_or_default(),
            retries: retries.unwrap_or_default(),
            limits: limits.unwrap_or_default(),
            state: state.unwrap_or_default(),
            audit_log: audit_log.unwrap_or_default(),
        }),
        _ => Err(errs.list),
    }
}

fn opt_section<T: DeserializeOwned + Default>(
    v: Value,
    path: &str,
    errs: &mut Errors,
) -> Option<T> {
    if v.is_null() {
        Some(T::default())
    } else {
        de(v, path, errs)
    }
}

/// Line lookups for the semantic checks of `config/validate/`.
pub fn errors_for(text: &str) -> Errors {
    let (text, _) = substitute_env(text, |n| std::env::var(n).ok());
    Errors {
        lines: index_lines(&text),
        list: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_substitution_reports_missing_with_line() {
        let (out, errs) = substitute_env("a: ${X}\n# ${Y}\nb: ${Z}-x\n", |n| {
            (n == "X").then(|| "1".to_string())
        });
        assert_eq!(out, "a: 1\n# ${Y}\nb: -x\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(3));
        assert!(errs[0].message.contains("Z"));
    }

    #[test]
    fn line_index_knows_nested_paths() {
        let text = "server:\n  listeners:\n    - address: x\n    - address: y\nclients:\n  - id: a\n    allow:\n      deployments: [d]\n";
        let lines = index_lines(text);
        assert_eq!(lines.get("server"), Some(&1));
        assert_eq!(lines.get("server.listeners[1].address"), Some(&4));
        assert_eq!(lines.get("clients[0].id"), Some(&6));
        assert_eq!(lines.get("clients[0].allow.deployments"), Some(&8));
        assert_eq!(lines.get("clients[0].allow.deployments[0]"), Some(&8));
    }

    #[test]
    fn every_structural_error_is_reported() {
        let text = "\
server:
  listeners: [{address: 127.0.0.1:1}]
  bogus: 1
clients:
  - id: a
    allow: {deployments: [x], operations: [y]}
    colour: red
  - id: b
    allow: {deployments: [x], operations: [y]}
    limits: {requests_per_minute: many}
extra: 1
deployments: {}
backends: []
";
        let errs = parse(text).unwrap_err();
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{shown:#?}");
        assert!(
            shown.iter().any(|s| s.starts_with("line 11: extra:")),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 3: server.bogus")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("line 7: clients[0].colour")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("line 10: clients[1].limits.requests_per_minute")),
            "{shown:#?}"
        );
    }

    #[test]
    fn missing_variable_is_reported_with_its_path() {
        let text = "server:\n  listeners: []\nbackends:\n  - name: b\n    api_key: ${AGW_UNIT_SURELY_UNSET}\n";
        let errs = parse(text).unwrap_err();
        let e = errs
            .iter()
            .find(|e| e.message.contains("AGW_UNIT_SURELY_UNSET"))
            .unwrap();
        assert_eq!(e.line, Some(5));
        assert_eq!(e.path, "backends[0].api_key");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let errs = parse("server:\n  listeners: [\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line.is_some());
        assert!(errs[0].message.starts_with("not valid YAML"));
    }
}
