//! Names one resource: `kind`, `namespace` (none for cluster-wide kinds), `name`. The store,
//! the push protocol (deltas name what they replace or remove) and the incremental compiler
//! all key resources by it.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::resource::Resource;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ResourceKey {
    pub fn of(resource: &Resource) -> Self {
        let meta = resource.metadata();
        ResourceKey { kind: resource.kind().to_string(), namespace: meta.namespace.clone(), name: meta.name.clone() }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}
