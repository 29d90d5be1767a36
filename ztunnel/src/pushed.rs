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

use std::sync::Arc;

use palisade_model::Snapshot;
use palisade_model::compile::{Compiler, Identities};
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
    identities: Arc<Identities>,
}

/// The resources, and the incremental compiler that holds what their last snapshot was made
/// of (a one-policy change at 10,000 workloads compiles in about a millisecond).
pub struct Pushed {
    resources: BTreeMap<ResourceKey, Located>,
    compiler: Compiler,
    identities: Arc<Identities>,
}

impl Pushed {
    pub fn new(trust_domain: &str) -> Self {
        Pushed { resources: BTreeMap::new(), compiler: Compiler::new(trust_domain), identities: Arc::default() }
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Changes the resources by `delta`, compiles them with `identities`, and returns the
    /// snapshot with what puts everything back ([`Self::undo`]).
    pub fn apply(&mut self, delta: ResourceDelta, identities: Arc<Identities>) -> (Arc<Snapshot>, Undo) {
        let previous = std::mem::replace(&mut self.identities, identities);
        let (upserts, removals, undo) = match delta.full {
            true => {
                let fresh: BTreeMap<_, _> = delta.put.into_iter().map(|l| (ResourceKey::of(&l.resource), l)).collect();
                let removals = self.resources.keys().filter(|k| !fresh.contains_key(*k)).cloned().collect();
                let upserts = fresh.values().cloned().collect();
                let old = std::mem::replace(&mut self.resources, fresh);
                (upserts, removals, Undo { full: Some(old), before: vec![], identities: previous })
            }
            false => {
                let mut before = Vec::with_capacity(delta.put.len() + delta.removed.len());
                for key in &delta.removed {
                    before.push((key.clone(), self.resources.remove(key)));
                }
                for located in &delta.put {
                    let key = ResourceKey::of(&located.resource);
                    let old = self.resources.insert(key.clone(), located.clone());
                    before.push((key, old));
                }
                (delta.put, delta.removed, Undo { full: None, before, identities: previous })
            }
        };
        let snapshot = self.compiler.update(upserts, &removals, &self.identities);
        (snapshot, undo)
    }

    /// Puts the resources, the numbers and the compiler back as they were before the delta
    /// `undo` came from.
    pub fn undo(&mut self, undo: Undo) {
        self.identities = undo.identities;
        let (upserts, removals) = match undo.full {
            Some(full) => {
                let removals = self.resources.keys().filter(|k| !full.contains_key(*k)).cloned().collect();
                let upserts = full.values().cloned().collect();
                self.resources = full;
                (upserts, removals)
            }
            None => {
                let (mut upserts, mut removals) = (Vec::new(), Vec::new());
                // In reverse, so a key touched twice ends as it first was.
                for (key, old) in undo.before.into_iter().rev() {
                    match old {
                        Some(old) => {
                            self.resources.insert(key, old.clone());
                            upserts
                                .retain(|l: &Located| ResourceKey::of(&l.resource) != ResourceKey::of(&old.resource));
                            upserts.push(old);
                        }
                        None => {
                            self.resources.remove(&key);
                            removals.push(key);
                        }
                    }
                }
                removals.retain(|k| !self.resources.contains_key(k));
                (upserts, removals)
            }
        };
        self.compiler.update(upserts, &removals, &self.identities);
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

    fn workload(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: a}}\n\
             spec: {{serviceAccount: {name}, node: n, addresses: [{ip}]}}\n"
        )
    }

    fn wkey(name: &str) -> ResourceKey {
        ResourceKey { kind: "Workload".into(), namespace: Some("a".into()), name: name.into() }
    }

    #[test]
    fn a_delta_and_its_undo_leave_resources_and_snapshot_as_they_were() {
        let mut pushed = Pushed::new("cluster.local");
        let (a, w) = (doc("a", "x"), workload("w", "10.0.0.1"));
        let full = ResourceDelta::parse(true, [(key("a"), a.as_str()), (wkey("w"), w.as_str())], vec![]).unwrap();
        let (first, _) = pushed.apply(full, Arc::default());
        let before = names(&pushed);
        let addr = "10.0.0.1".parse().unwrap();
        assert!(first.identity_of(addr) >= palisade_model::compile::FIRST_WORKLOAD_IDENTITY);

        let (a2, v) = (doc("a", "y"), workload("v", "10.0.0.2"));
        let delta =
            ResourceDelta::parse(false, [(key("a"), a2.as_str()), (wkey("v"), v.as_str())], vec![wkey("w")]).unwrap();
        let (second, undo) = pushed.apply(delta, Arc::default());
        assert_eq!(second.identity_of(addr), palisade_ebpf_common::IDENTITY_WORLD, "w is gone");
        let after = names(&pushed);
        assert_eq!(after.len(), 2);
        assert!(after[0].contains("team: y"), "{after:?}");
        pushed.undo(undo);
        assert_eq!(names(&pushed), before, "the undo puts back exactly what was there");
        let (again, _) = pushed.apply(ResourceDelta::default(), Arc::default());
        assert_eq!(again.identity_of(addr), first.identity_of(addr), "and the compiler with them");
    }

    #[test]
    fn a_document_that_is_not_what_its_key_names_is_refused_by_name() {
        let a = doc("a", "x");
        let err =
            ResourceDelta::parse(false, [(key("other"), a.as_str()), (key("bad"), "kind: [")], vec![]).unwrap_err();
        assert!(err.contains("control-plane:Namespace other") && err.contains("control-plane:Namespace bad"), "{err}");
    }
}
