//! Configuration: file types, loading with located errors, validated runtime types.

pub mod file;
pub mod load;
pub mod runtime;

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
    runtime::validate(file, load::errors_for(text))
}
