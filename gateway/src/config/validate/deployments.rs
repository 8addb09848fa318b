//! `deployments`: each name's members, resolved to backend indexes, with their upstream
//! deployment names, priorities and weights.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::file::MemberFile;
use crate::config::load::Errors;
use crate::config::runtime::{Deployment, Member};

/// By name, as [`crate::config::runtime::Config::deployments`].
pub(super) type Deployments = HashMap<String, Arc<Deployment>, foldhash::fast::RandomState>;

/// The deployments by name, and their names in file order.
pub(super) fn deployments(
    file: &BTreeMap<String, Vec<MemberFile>>,
    backend_index: &HashMap<String, usize>,
    errs: &mut Errors,
) -> (Deployments, Vec<Arc<str>>) {
    let mut deployments = Deployments::default();
    let mut names = Vec::new();
    if file.is_empty() {
        errs.at("deployments", "at least one deployment is needed");
    }
    for (name, members) in file {
        let members = members_of(name, members, backend_index, errs);
        let n: Arc<str> = Arc::from(name.as_str());
        names.push(n.clone());
        deployments.insert(name.clone(), Arc::new(Deployment { name: n, members }));
    }
    (deployments, names)
}

/// The members of deployment `name`, best priority first; a member naming an unknown
/// backend is left out (after its error).
fn members_of(
    name: &str,
    members: &[MemberFile],
    backend_index: &HashMap<String, usize>,
    errs: &mut Errors,
) -> Vec<Member> {
    let path = format!("deployments.{name}");
    if members.is_empty() {
        errs.at(&path, "a deployment needs at least one member");
    }
    let mut seen = HashSet::new();
    let mut ms = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let Some(&b) = backend_index.get(&m.backend) else {
            errs.at(
                format!("{path}[{i}].backend"),
                format!("unknown backend `{}`", m.backend),
            );
            continue;
        };
        let up = m.deployment.clone().unwrap_or_else(|| name.to_string());
        if !seen.insert((b, up.clone())) {
            errs.at(
                format!("{path}[{i}]"),
                "the same backend and deployment is listed twice",
            );
        }
        if m.weight == 0 {
            errs.at(format!("{path}[{i}].weight"), "must be at least 1");
        }
        if up.is_empty() || up.contains('/') {
            errs.at(format!("{path}[{i}].deployment"), "not a deployment name");
        }
        ms.push(Member {
            backend: b,
            upstream_deployment: Arc::from(up.as_str()),
            priority: m.priority,
            weight: m.weight.max(1),
        });
    }
    ms.sort_by_key(|m| m.priority);
    ms
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;

    fn backends() -> HashMap<String, usize> {
        HashMap::from([("east".to_string(), 0), ("west".to_string(), 1)])
    }

    fn check(file: &BTreeMap<String, Vec<MemberFile>>, errs: &mut Errors) -> Vec<Arc<str>> {
        deployments(file, &backends(), errs).1
    }

    #[test]
    fn errors_have_their_paths() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[("deployments", "at least one deployment is needed")]),
            (
                "{a: [], b: [{backend: east}]}",
                &[("deployments.a", "a deployment needs at least one member")],
            ),
            (
                "{a: [{backend: east}, {backend: north}]}",
                &[("deployments.a[1].backend", "unknown backend `north`")],
            ),
            (
                "{a: [{backend: east}, {backend: east, deployment: a}, {backend: east, deployment: b}]}",
                &[(
                    "deployments.a[1]",
                    "the same backend and deployment is listed twice",
                )],
            ),
            (
                "{a: [{backend: east, weight: 0}, {backend: west, deployment: ''}, {backend: west, deployment: x/y}]}",
                &[
                    ("deployments.a[0].weight", "must be at least 1"),
                    ("deployments.a[1].deployment", "not a deployment name"),
                    ("deployments.a[2].deployment", "not a deployment name"),
                ],
            ),
        ];
        assert_cases(cases, check);
    }

    #[test]
    fn members_resolve_and_sort_by_priority() {
        let yaml = "
b: [{backend: west}]
a:
  - {backend: east, priority: 2, weight: 0}
  - {backend: west, deployment: a-2024, priority: 1, weight: 5}
  - {backend: north}
";
        let ((deps, names), errs) = run(
            yaml,
            |f: &BTreeMap<String, Vec<MemberFile>>, errs: &mut Errors| {
                deployments(f, &backends(), errs)
            },
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(
            names,
            [Arc::from("a"), Arc::from("b")],
            "sorted by name, whatever the file order"
        );
        let a = &deps["a"].members;
        let got: Vec<_> = a
            .iter()
            .map(|m| (m.backend, &*m.upstream_deployment, m.priority, m.weight))
            .collect();
        assert_eq!(got, [(1, "a-2024", 1, 5), (0, "a", 2, 1)]);
    }
}
