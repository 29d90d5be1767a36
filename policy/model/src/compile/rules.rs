//! The rule numbers of a snapshot. Each policy owns `first_rule..first_rule + rules.len()`;
//! [`Rules`] finds the policy of a number instead of holding one entry per rule, so a
//! snapshot built from the previous one shares its policies and does not copy 100,000 names.
//! Numbers need not be dense: the incremental [`super::Compiler`] keeps a policy's numbers
//! while it exists, so removing one leaves a gap.
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::{PolicyEntry, RuleRef};

#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Policies with at least one rule, by `first_rule`.
    ranges: Arc<Vec<Arc<PolicyEntry>>>,
}

impl Rules {
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Arc<PolicyEntry>>) -> Rules {
        let mut ranges: Vec<Arc<PolicyEntry>> = policies.into_iter().filter(|p| !p.rules.is_empty()).cloned().collect();
        ranges.sort_unstable_by_key(|p| p.first_rule);
        Rules { ranges: Arc::new(ranges) }
    }

    /// The rule numbered `n`, if a policy has it.
    pub fn get(&self, n: u32) -> Option<RuleRef> {
        let after = self.ranges.partition_point(|p| p.first_rule <= n);
        let p = &self.ranges[after.checked_sub(1)?];
        let index = (n - p.first_rule) as usize;
        (index < p.rules.len()).then(|| rule_ref(p, index))
    }

    /// How many rules (not the largest number: numbers may have gaps).
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|p| p.rules.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Every rule with its number, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, RuleRef)> + '_ {
        self.ranges.iter().flat_map(|p| (0..p.rules.len()).map(move |i| (p.first_rule + i as u32, rule_ref(p, i))))
    }
}

fn rule_ref(p: &PolicyEntry, index: usize) -> RuleRef {
    RuleRef {
        policy: p.name.clone(),
        kind: p.kind.clone(),
        direction: p.direction,
        index,
        action: p.action,
        mode: p.mode,
    }
}

impl PartialEq for Rules {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Serialize for Rules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(|(_, r)| r))
    }
}
