//! Configuration: file types, loading with located errors, validated runtime types.

pub mod file;
pub mod load;
pub mod runtime;
mod validate;

pub use load::ConfigError;
pub use runtime::Config;

/// Reads, substitutes, parses and validates a configuration file, returning every error.
pub fn load_file(path: &std::path::Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }]
    })?;
    load_str(&text)
}

/// As [`load_file`], from text.
pub fn load_str(text: &str) -> Result<Config, Vec<ConfigError>> {
    let file = load::parse(text)?;
    validate::validate(file, load::errors_for(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(name);
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn shipped_example_parses() {
        std::env::set_var("AFD_ID", "x");
        std::env::set_var("TENANT_ID", "t");
        std::env::set_var("AOAI_SWEDEN_KEY", "k");
        let f = load::parse(&repo_file("conf/example.yaml")).expect("example parses");
        assert_eq!(f.clients.len(), 2);
        assert_eq!(f.deployments["gpt-4o"].len(), 2);
    }

    #[test]
    fn demo_config_is_valid() {
        std::env::set_var("AOAI_SWEDEN_KEY", "k");
        let cfg = load_str(&repo_file("conf/demo.yaml")).expect("demo is valid");
        assert!(cfg.needs_upstream_token());
        assert_eq!(
            cfg.deployments["gpt-4o"].members[0]
                .upstream_deployment
                .as_ref(),
            "gpt-4o-2024-08-06"
        );
    }

    #[test]
    fn semantic_errors_are_all_reported_with_lines() {
        let text = "\
server:
  listeners: [{address: 127.0.0.1:8080}]
clients:
  - id: a
    api_keys: [{sha256: nothex}]
    allow: {deployments: [nope], operations: [chat.completions, fine_tuning]}
deployments:
  d:
    - backend: missing
backends:
  - name: b
    url: ftp://x
    credential: api_key
";
        let errs = load_str(text).unwrap_err();
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for want in [
            "line 5: clients[0].api_keys[0].sha256",
            "line 6: clients[0].allow.deployments[0]",
            "line 6: clients[0].allow.operations[1]",
            "line 9: deployments.d[0].backend",
            "line 12: backends[0].url",
            "line 11: backends[0].api_key",
        ] {
            assert!(
                shown.iter().any(|s| s.starts_with(want)),
                "missing {want:?} in {shown:#?}"
            );
        }
    }
}
