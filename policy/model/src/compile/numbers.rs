//! Stable numbers for the incremental [`super::Compiler`]: a policy keeps its rule numbers and
//! an address block its identity while they exist, so adding or removing one rewrites only
//! its own kernel cells (the from-scratch [`super::compile_with`] numbers in sorted order, and
//! one insertion there shifts every later number).
use std::collections::BTreeMap;

use palisade_ebpf_common::RULE_EGRESS_DEFAULT_DENY;

use super::{FIRST_CIDR_IDENTITY, FIRST_SERVICE_IDENTITY};
use crate::cidr::Cidr;

/// Rule numbers stay clear of the `RULE_*` sentinels at the top of the range.
const RULE_LIMIT: u32 = RULE_EGRESS_DEFAULT_DENY - 250;

/// Ranges of rule numbers. New ranges go above the largest number in use; a range freed at
/// the top lowers the top again. Freed ranges below the top are reused only when the top is
/// exhausted (first fit), which takes four billion rules of churn: numbers stay put.
#[derive(Debug, Default)]
pub(super) struct RuleNumbers {
    next: u32,
    free: Vec<(u32, u32)>,
}

impl RuleNumbers {
    pub(super) fn allocate(&mut self, len: u32) -> u32 {
        if len == 0 {
            return self.next;
        }
        if self.next.checked_add(len).is_some_and(|end| end <= RULE_LIMIT) {
            self.next += len;
            return self.next - len;
        }
        let i = self.free.iter().position(|&(_, l)| l >= len).expect("rule numbers exhausted");
        let (start, l) = self.free[i];
        if l == len {
            self.free.swap_remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        start
    }

    pub(super) fn release(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        self.free.push((start, len));
        // Give the top back while the highest free range ends there.
        while let Some(i) = self.free.iter().position(|&(s, l)| s + l == self.next) {
            self.next = self.free.swap_remove(i).0;
        }
    }
}

/// Identities of address blocks named by policies, with how many policies name each.
#[derive(Debug, Default)]
pub(super) struct CidrNumbers {
    ids: BTreeMap<Cidr, (u32, usize)>,
    /// Named for the first time in this update: numbered in sorted order at its end.
    pending: BTreeMap<Cidr, usize>,
}

impl CidrNumbers {
    pub(super) fn hold(&mut self, block: Cidr) {
        match self.ids.get_mut(&block) {
            Some((_, refs)) => *refs += 1,
            None => *self.pending.entry(block).or_default() += 1,
        }
    }

    pub(super) fn release(&mut self, block: Cidr) {
        if let Some((_, refs)) = self.ids.get_mut(&block) {
            *refs -= 1;
        } else if let Some(refs) = self.pending.get_mut(&block) {
            *refs -= 1;
        }
    }

    /// Numbers the new blocks above the largest number in use (the lowest free one once
    /// that reaches the Service range) and forgets the blocks nobody names. Whether the set
    /// of blocks changed.
    pub(super) fn settle(&mut self) -> bool {
        let before = self.ids.len();
        self.ids.retain(|_, (_, refs)| *refs > 0);
        let mut changed = self.ids.len() != before;
        for (block, refs) in std::mem::take(&mut self.pending) {
            if refs == 0 {
                continue;
            }
            let top = self.ids.values().map(|(id, _)| *id).max().map_or(FIRST_CIDR_IDENTITY, |m| m + 1);
            let id = if top < FIRST_SERVICE_IDENTITY {
                top
            } else {
                let used: std::collections::BTreeSet<u32> = self.ids.values().map(|(id, _)| *id).collect();
                (FIRST_CIDR_IDENTITY..FIRST_SERVICE_IDENTITY)
                    .find(|n| !used.contains(n))
                    .expect("block identities exhausted")
            };
            self.ids.insert(block, (id, refs));
            changed = true;
        }
        changed
    }

    /// Every block with its identity, in block order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Cidr, u32)> + '_ {
        self.ids.iter().map(|(c, (id, _))| (*c, *id))
    }
}
