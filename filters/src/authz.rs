//! Authorization: is this client allowed this deployment and this operation?

use std::collections::HashSet;

use crate::{FilterError, Operation};

/// A set that is either everything (`"*"`) or the listed names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowSet<T: std::hash::Hash + Eq> {
    All,
    Only(HashSet<T>),
}

impl<T: std::hash::Hash + Eq> AllowSet<T> {
    pub fn contains<Q>(&self, item: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        match self {
            AllowSet::All => true,
            AllowSet::Only(set) => set.contains(item),
        }
    }
}

/// What one client may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub deployments: AllowSet<String>,
    pub operations: AllowSet<Operation>,
}

impl Policy {
    /// The pure decision. `deployment` is `None` for gateway-answered operations (`models.read`).
    pub fn check(&self, operation: Operation, deployment: Option<&str>) -> Result<(), FilterError> {
        if !self.operations.contains(&operation) {
            return Err(FilterError::OperationNotAllowed);
        }
        match deployment {
            Some(d) if !self.deployments.contains(d) => Err(FilterError::DeploymentNotAllowed),
            _ => Ok(()),
        }
    }

    /// Filters a list of deployment names down to those this policy allows (for `models.read`).
    pub fn visible<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        names.filter(|n| self.deployments.contains(*n)).collect()
    }
}

/// The authorization filter: the identified client's policy against the operation and
/// deployment.
pub struct AuthzFilter {
    /// Policies by client index (configured clients, then unlisted-client templates).
    pub policies: std::sync::Arc<Vec<Policy>>,
}

impl<'a> crate::RequestFilter<crate::Planned<'a>> for AuthzFilter {
    type Pass = ();

    async fn apply(&self, p: &crate::Planned<'a>) -> Result<(), FilterError> {
        self.policies[p.identity.client].check(p.operation, p.deployment)?;
        match &p.identity.grants {
            Some(g) => g.check(p.operation, p.deployment),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            deployments: AllowSet::Only(["gpt-4o".to_string()].into_iter().collect()),
            operations: AllowSet::Only([Operation::ChatCompletions].into_iter().collect()),
        }
    }

    #[test]
    fn allowed_pair_passes() {
        assert_eq!(
            policy().check(Operation::ChatCompletions, Some("gpt-4o")),
            Ok(())
        );
    }

    #[test]
    fn other_deployment_is_refused() {
        assert_eq!(
            policy().check(Operation::ChatCompletions, Some("gpt-4o-mini")),
            Err(FilterError::DeploymentNotAllowed)
        );
    }

    #[test]
    fn operation_is_checked_before_deployment() {
        assert_eq!(
            policy().check(Operation::Embeddings, Some("other")),
            Err(FilterError::OperationNotAllowed)
        );
    }

    #[test]
    fn models_read_needs_the_operation() {
        assert_eq!(
            policy().check(Operation::ModelsRead, None),
            Err(FilterError::OperationNotAllowed)
        );
        let all = Policy {
            deployments: AllowSet::All,
            operations: AllowSet::All,
        };
        assert_eq!(all.check(Operation::ModelsRead, None), Ok(()));
    }

    #[test]
    fn visible_lists_only_allowed() {
        let names = ["gpt-4o", "ada"];
        assert_eq!(policy().visible(names.into_iter()), vec!["gpt-4o"]);
    }
}
