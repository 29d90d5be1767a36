//! The base after Workloads changed, without building it again from every resource: when the
//! identity numbers come from the map (as the control plane's store gives every identity one),
//! a new or vanished identity shifts no other number, so only the identities of the changed
//! workloads are built again; workloads and addresses are re-read from the previous snapshot's
//! entries. Anything else (a Namespace changed, an identity the map does not number, another
//! map) goes through the full build.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::super::build::identity_labels;
use super::super::{Identities, Identity, IdentityLabels, WorkloadEntry, canonical};
use super::Compiler;
use crate::k8s;
use crate::key::ResourceKey;
use crate::resource::{Action, Resource};

impl Compiler {
    /// Builds the base for workloads whose identities are `labels` (before and after the
    /// change) and those whose keys are `keys`; false when only a full build can.
    pub(super) fn patch_base(
        &mut self,
        identities: &Identities,
        labels: &BTreeSet<IdentityLabels>,
        keys: &BTreeSet<ResourceKey>,
    ) -> bool {
        // The map may only have grown (as the store's does): then no number moves.
        let kept = self.numbered.iter().all(|(l, n)| identities.get(l) == Some(n));
        if self.unnumbered > 0 || !kept || labels.iter().any(|l| identities.get(l).is_none()) {
            return false;
        }
        let base = &mut self.base;
        let old: HashMap<(&str, &str), &WorkloadEntry> =
            base.workloads.iter().map(|w| ((w.namespace.as_str(), w.name.as_str()), w)).collect();
        let mut workloads = Vec::with_capacity(base.workloads.len());
        for (key, l) in &self.inputs {
            let Resource::Workload { metadata, spec, .. } = &l.resource else { continue };
            let namespace = key.namespace.as_deref().unwrap_or_default();
            if !keys.contains(key)
                && let Some(w) = old.get(&(namespace, metadata.name.as_str()))
            {
                workloads.push((*w).clone());
                continue;
            }
            let Some(id) = identity_labels(&l.resource).and_then(|l| identities.get(&l)) else { return false };
            workloads.push(WorkloadEntry {
                name: metadata.name.clone(),
                namespace: namespace.to_string(),
                node: spec.node.clone(),
                uid: spec.uid.clone(),
                addresses: spec.addresses.clone(),
                identity: id,
                ports: spec.ports.clone(),
            });
        }
        let (mut addresses, mut workload_at) = (HashMap::new(), HashMap::new());
        for (i, w) in workloads.iter().enumerate() {
            for a in &w.addresses {
                addresses.insert(canonical(*a), w.identity);
                workload_at.insert(canonical(*a), i);
            }
        }
        let ids = Arc::make_mut(&mut base.identities);
        let namespaces = Arc::make_mut(&mut base.namespaces);
        for l in labels {
            let id = identities.get(l).expect("checked above");
            let members: Vec<&WorkloadEntry> = workloads.iter().filter(|w| w.identity == id).collect();
            if members.is_empty() {
                ids.remove(&id);
            } else {
                let default = match self.inputs.get(&namespace_key(&l.namespace)).map(|n| &n.resource) {
                    Some(Resource::Namespace { spec, .. }) => spec.default_action,
                    _ => Action::default(),
                };
                let identity = Identity {
                    id,
                    labels: l.clone(),
                    default_deny: default == Action::Deny,
                    default_reason: format!("namespace {} default {:?}", l.namespace, default),
                    egress_default_deny: false,
                    egress_default_reason: String::new(),
                    addresses: members.iter().flat_map(|w| w.addresses.iter().map(|a| canonical(*a))).collect(),
                };
                ids.insert(id, Arc::new(identity));
            }
            // A namespace is known while it has a Namespace or an identity.
            let known = self.inputs.contains_key(&namespace_key(&l.namespace))
                || ids.values().any(|i| i.labels.namespace == l.namespace);
            match (known, namespaces.contains_key(&l.namespace)) {
                (true, false) => {
                    let labels = k8s::namespace_labels(&l.namespace, &Default::default());
                    namespaces.insert(l.namespace.clone(), labels);
                }
                (false, true) => {
                    namespaces.remove(&l.namespace);
                }
                _ => {}
            }
        }
        if identities.len() != self.numbered.len() {
            self.numbered = identities.clone();
        }
        base.workloads = Arc::new(workloads);
        base.addresses = Arc::new(addresses);
        base.workload_at = Arc::new(workload_at);
        true
    }
}

fn namespace_key(name: &str) -> ResourceKey {
    ResourceKey { kind: "Namespace".into(), namespace: None, name: name.to_string() }
}
