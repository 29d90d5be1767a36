//! Which identities are isolated (default deny) by the Allow policies that select them, kept
//! per identity so that a change rebuilds only the identities it moves.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::super::cells::isolated;
use super::super::{Direction, Identity};
use super::Compiler;

impl Compiler {
    /// A base identity isolated by the first policy (in key order) that does, per direction.
    fn isolated(&self, id: u32, base: &Arc<Identity>) -> Arc<Identity> {
        let first = |d| {
            let key = self.isolators.get(&(d, id)).and_then(|s| s.first());
            key.map(|k| (k.kind.as_str(), k.name.as_str()))
        };
        isolated(base, first(Direction::Ingress), first(Direction::Egress))
    }

    /// Every identity after the base was built again: the previous one where neither its base
    /// (`old`) nor its isolating policies changed.
    pub(super) fn isolate_all(&mut self, old: &BTreeMap<u32, Arc<Identity>>, changed: &BTreeSet<u32>) {
        let identities = self
            .base
            .identities
            .iter()
            .map(|(id, b)| {
                let kept = self.identities.get(id).filter(|_| !changed.contains(id) && old.get(id) == Some(b));
                (*id, kept.cloned().unwrap_or_else(|| self.isolated(*id, b)))
            })
            .collect();
        self.identities = Arc::new(identities);
    }

    /// The identities whose isolating policies changed.
    pub(super) fn isolate(&mut self, changed: &BTreeSet<u32>) {
        let one = |id: u32, base: &Arc<Identity>| self.isolated(id, base);
        let same = |a: &Identity, b: &Identity| {
            (a.default_deny, &a.default_reason, a.egress_default_deny, &a.egress_default_reason)
                == (b.default_deny, &b.default_reason, b.egress_default_deny, &b.egress_default_reason)
        };
        let mut updates = Vec::new();
        for id in changed {
            let (Some(base), Some(now)) = (self.base.identities.get(id), self.identities.get(id)) else { continue };
            let new = one(*id, base);
            if !same(&new, now) {
                updates.push((*id, new));
            }
        }
        if !updates.is_empty() {
            Arc::make_mut(&mut self.identities).extend(updates);
        }
    }
}
