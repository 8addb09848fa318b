//! Replays every seed (`fuzz/seeds/<target>/`) and every saved finding
//! (`fuzz/regressions/<target>/`) through its target's check, on stable:
//!
//! ```text
//! cargo test --manifest-path fuzz/Cargo.toml
//! ```
//!
//! A file that fails is named with its panic message; all files of a target are tried
//! before the test fails.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    v
}

fn replay(target: &str) {
    let check = aoai_gateway_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .expect("a known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tried = 0;
    let mut failed = Vec::new();
    for kind in ["seeds", "regressions"] {
        for file in files(&root.join(kind).join(target)) {
            let data = std::fs::read(&file).expect("readable");
            tried += 1;
            if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: {msg}", file.display()));
            }
        }
    }
    assert!(tried > 0, "no seeds for {target}");
    assert!(
        failed.is_empty(),
        "{target}: {} of {tried} inputs fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Every saved input of a known finding (`regressions/<target>/F<n>-*`) still fails its
/// check when known findings are not stepped around. When one no longer does, the finding
/// is fixed: remove its `known("F<n>", …)` exemption in fuzz/src and drop the `F<n>-`
/// prefix from the file name (it stays as a plain regression).
#[test]
fn known_findings_reproduce() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut fixed = Vec::new();
    for (target, check) in aoai_gateway_fuzz::TARGETS {
        for file in files(&root.join("regressions").join(target)) {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            let is_known = name.starts_with('F')
                && name[1..]
                    .split('-')
                    .next()
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !is_known {
                continue;
            }
            let data = std::fs::read(&file).expect("readable");
            aoai_gateway_fuzz::set_strict(true);
            let failed = std::panic::catch_unwind(|| check(&data)).is_err();
            aoai_gateway_fuzz::set_strict(false);
            if !failed {
                fixed.push(format!("{target}/{name}"));
            }
        }
    }
    assert!(
        fixed.is_empty(),
        "known findings that no longer fail (fixed? see the doc comment): {fixed:?}"
    );
}

macro_rules! replay_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            replay(stringify!($name));
        }
    )*};
}

replay_tests!(
    request_head,
    chunked_body,
    response_framing,
    body_fields,
    sse_usage,
    config_load,
    framing_differential,
    multipart_model
);

/// The seeds of the differential target exercise every exemption rule at least once, so
/// that a rule that no longer matches anything is noticed.
#[test]
fn differential_rules_are_exercised() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = std::collections::BTreeSet::new();
    for kind in ["seeds", "regressions"] {
        for file in files(&root.join(kind).join("framing_differential")) {
            let data = std::fs::read(&file).expect("readable");
            if let Some(rule) = aoai_gateway_fuzz::differential::excuse(&data) {
                seen.insert(rule);
            }
        }
    }
    for rule in ["R1", "R2"] {
        assert!(
            seen.contains(rule),
            "no seed exercises rule {rule} (seen: {seen:?})"
        );
    }
}

/// `cargo test --manifest-path fuzz/Cargo.toml -- --ignored --nocapture differential_summary`
/// prints how the gateway and hyper read each seed of the differential target.
#[test]
#[ignore]
fn differential_summary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for kind in ["seeds", "regressions"] {
        for file in files(&root.join(kind).join("framing_differential")) {
            let data = std::fs::read(&file).expect("readable");
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            println!(
                "{kind}/{name}: {}",
                aoai_gateway_fuzz::differential::summary(&data)
            );
        }
    }
}

/// Observation (README.md, O1): a request head is parsed again from its start after every
/// read, so a head that arrives a byte per read costs time quadratic in its size. Prints the
/// time to read a head of about 60 KiB delivered in 1-byte reads, and in 1 KiB reads:
/// `cargo test --release --manifest-path fuzz/Cargo.toml -- --ignored --nocapture head_in_small_reads`
#[test]
#[ignore]
fn head_in_small_reads() {
    use aoai_gateway_fuzz::{block_on, gateway_requests, Delivery};
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        head.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(590)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    for piece in [1024, 64, 1] {
        let t = std::time::Instant::now();
        let run = block_on(gateway_requests(&head, Delivery::Trickle(piece)));
        assert_eq!(run.requests.len(), 1);
        println!(
            "{} byte head in {piece}-byte reads: {:?}",
            head.len(),
            t.elapsed()
        );
    }
}
