//! The resources the control plane pushed, as this node has them: the whole set after the
//! first response of a stream, then changed by each delta. A delta is applied with its undo,
//! so a snapshot that cannot be put in force (NACK) leaves the set exactly as it was.
//!
//! The node does not validate the set again: `palisade serve` validated every change against
//! the whole set before it reached the store, and validating 10,000 workloads' policies on
//! every node at every change would cost seconds. What a node checks is what can differ
//! between it and the server: every document must read as a resource of a kind this ztunnel
//! knows (an older ztunnel behind a newer server NACKs, naming the document), and the
//! identity numbers must be consistent.
use std::collections::BTreeMap;
use std::path::Path;

use palisade_model::Snapshot;
use palisade_model::compile::Identities;
use palisade_model::key::ResourceKey;
use palisade_model::load::{self, Located};

/// What one response changes.
#[derive(Debug, Default)]
pub struct ResourceDelta {
    /// The documents are the whole set: everything else goes.
    pub full: bool,
    pub put: Vec<Located>,
    pub removed: Vec<ResourceKey>,
}

impl ResourceDelta {
    /// Reads each `(key, yaml)` document; every one that does not read as exactly the
    /// resource its key names is an error, all of them named.
    pub fn parse<'a>(
        full: bool,
        documents: impl IntoIterator<Item = (ResourceKey, &'a str)>,
        removed: Vec<ResourceKey>,
    ) -> Result<Self, String> {
        let mut put = Vec::new();
        let mut problems = Vec::new();
        for (key, yaml) in documents {
            let origin = format!("control-plane:{key}");
            match load::parse_str(Path::new(&origin), yaml) {
                Ok(mut docs) if docs.len() == 1 && ResourceKey::of(&docs[0].resource) == key => {
                    put.push(docs.remove(0))
                }
                Ok(docs) => {
                    problems.push(format!("{origin}: holds {} resource(s), not the one its key names", docs.len()))
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        match problems.is_empty() {
            true => Ok(ResourceDelta { full, put, removed }),
            false => Err(problems.join("\n")),
        }
    }
}

/// What a delta replaced, to put it back.
#[derive(Debug)]
pub struct Undo {
    full: Option<BTreeMap<ResourceKey, Located>>,
    /// Each key the delta touched, with what it held before (None: absent).
    before: Vec<(ResourceKey, Option<Located>)>,
}

#[derive(Default)]
pub struct Pushed {
    resources: BTreeMap<ResourceKey, Located>,
}

impl Pushed {
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn apply(&mut self, delta: ResourceDelta) -> Undo {
        if delta.full {
            let fresh = delta.put.into_iter().map(|l| (ResourceKey::of(&l.resource), l)).collect();
            return Undo { full: Some(std::mem::replace(&mut self.resources, fresh)), before: vec![] };
        }
        let mut before = Vec::with_capacity(delta.put.len() + delta.removed.len());
        for key in delta.removed {
            let old = self.resources.remove(&key);
            before.push((key, old));
        }
        for located in delta.put {
            let key = ResourceKey::of(&located.resource);
            let old = self.resources.insert(key.clone(), located);
            before.push((key, old));
        }
        Undo { full: None, before }
    }

    pub fn undo(&mut self, undo: Undo) {
        if let Some(full) = undo.full {
            self.resources = full;
            return;
        }
        // In reverse, so a key touched twice ends as it first was.
        for (key, old) in undo.before.into_iter().rev() {
            match old {
                Some(old) => self.resources.insert(key, old),
                None => self.resources.remove(&key),
            };
        }
    }

    /// The snapshot of the whole set.
    pub fn compile(&self, trust_domain: &str, identities: &Identities) -> Snapshot {
        let resources: Vec<Located> = self.resources.values().cloned().collect();
        palisade_model::compile::compile_with(&resources, trust_domain, identities)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ResourceKey {
        ResourceKey { kind: "Namespace".into(), namespace: None, name: name.into() }
    }

    fn doc(name: &str, team: &str) -> String {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n"
        )
    }

    fn names(p: &Pushed) -> Vec<String> {
        p.resources.values().map(|l| serde_yaml::to_string(&l.resource).unwrap()).collect()
    }

    #[test]
    fn a_delta_and_its_undo() {
        let mut pushed = Pushed::default();
        let (a, b) = (doc("a", "x"), doc("b", "x"));
        let full = ResourceDelta::parse(true, [(key("a"), a.as_str()), (key("b"), b.as_str())], vec![]).unwrap();
        pushed.apply(full);
        let before = names(&pushed);

        let (a2, c) = (doc("a", "y"), doc("c", "x"));
        let delta = ResourceDelta::parse(false, [(key("a"), a2.as_str()), (key("c"), c.as_str())], vec![key("b")]);
        let undo = pushed.apply(delta.unwrap());
        let after = names(&pushed);
        assert_eq!(after.len(), 2);
        assert!(after[0].contains("team: y") && after[1].contains("name: c"), "{after:?}");
        pushed.undo(undo);
        assert_eq!(names(&pushed), before, "the undo puts back exactly what was there");
    }

    #[test]
    fn a_document_that_is_not_what_its_key_names_is_refused_by_name() {
        let a = doc("a", "x");
        let err =
            ResourceDelta::parse(false, [(key("other"), a.as_str()), (key("bad"), "kind: [")], vec![]).unwrap_err();
        assert!(err.contains("control-plane:Namespace other") && err.contains("control-plane:Namespace bad"), "{err}");
    }
}
