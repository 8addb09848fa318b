//! `allow` (of a client or of a provider's unlisted clients): the deployments and
//! operations it may use, `"*"` meaning all.

use std::collections::{BTreeMap, HashSet};

use filters::authz::{AllowSet, Policy};
use filters::Operation;

use crate::config::file::{AllowFile, MemberFile};
use crate::config::load::Errors;

/// `path` is that of the `allow` mapping; `deployments` are the file's, for the references.
pub(super) fn policy(
    a: &AllowFile,
    path: &str,
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> Policy {
    Policy {
        deployments: allowed_deployments(&a.deployments, path, deployments, errs),
        operations: allowed_operations(&a.operations, path, errs),
    }
}

fn allowed_deployments(
    names: &[String],
    path: &str,
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> AllowSet<String> {
    if names.iter().any(|d| d == "*") {
        return AllowSet::All;
    }
    for (i, d) in names.iter().enumerate() {
        if !deployments.contains_key(d) {
            errs.at(
                format!("{path}.deployments[{i}]"),
                format!("unknown deployment `{d}`"),
            );
        }
    }
    AllowSet::Only(names.iter().cloned().collect())
}

pub(super) fn allowed_operations(
    names: &[String],
    path: &str,
    errs: &mut Errors,
) -> AllowSet<Operation> {
    if names.iter().any(|o| o == "*") {
        return AllowSet::All;
    }
    let mut set = HashSet::new();
    for (i, o) in names.iter().enumerate() {
        match Operation::parse(o) {
            Some(op) => {
                set.insert(op);
            }
            None => errs.at(
                format!("{path}.operations[{i}]"),
                format!(
                    "unknown operation `{o}` (one of: {}, or \"*\")",
                    Operation::ALL.map(|o| o.as_str()).join(", ")
                ),
            ),
        }
    }
    AllowSet::Only(set)
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;

    fn deployments() -> BTreeMap<String, Vec<MemberFile>> {
        BTreeMap::from([("d".to_string(), Vec::new())])
    }

    fn check(a: &AllowFile, errs: &mut Errors) -> Policy {
        policy(a, "clients[0].allow", &deployments(), errs)
    }

    #[test]
    fn errors_have_their_paths() {
        let ops = Operation::ALL.map(|o| o.as_str()).join(", ");
        let unknown = |o: &str| format!("unknown operation `{o}` (one of: {ops}, or \"*\")");
        let (files, nope) = (unknown("fine_tuning"), unknown("Chat.Completions"));
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{deployments: [d], operations: [chat.completions]}", &[]),
            (
                "{deployments: [d, e, f], operations: ['*']}",
                &[
                    ("clients[0].allow.deployments[1]", "unknown deployment `e`"),
                    ("clients[0].allow.deployments[2]", "unknown deployment `f`"),
                ],
            ),
            // "*" anywhere allows all and the other names are not looked at.
            ("{deployments: [e, '*'], operations: [files, '*']}", &[]),
            (
                "{deployments: ['*'], operations: [embeddings, fine_tuning, Chat.Completions]}",
                &[
                    ("clients[0].allow.operations[1]", files.as_str()),
                    ("clients[0].allow.operations[2]", nope.as_str()),
                ],
            ),
        ];
        assert_cases(cases, check);
    }

    #[test]
    fn sets() {
        let (p, _) = run("{deployments: [d], operations: [embeddings]}", check);
        assert!(p.deployments.contains("d") && !p.deployments.contains("e"));
        assert!(p.operations.contains(&Operation::Embeddings));
        assert!(!p.operations.contains(&Operation::ChatCompletions));
        let (p, _) = run("{deployments: ['*'], operations: ['*']}", check);
        assert!(matches!(p.deployments, AllowSet::All));
        assert!(matches!(p.operations, AllowSet::All));
    }
}
