//! Numeric identities given from outside the compiler. The control plane keeps them in its
//! store, so they stay the same across recompiles and restarts: a new workload does not
//! renumber the others, and a change can be pushed as a delta. Identities the map does not
//! know (offline use: `palisade validate`, `explain`, ztunnel's file mode) are numbered above
//! the map's largest number, in sorted order, so the result is still deterministic.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{FIRST_CIDR_IDENTITY, FIRST_WORKLOAD_IDENTITY, IdentityLabels};

/// Identity → number, each number at most once, all in
/// `FIRST_WORKLOAD_IDENTITY..FIRST_CIDR_IDENTITY`. Serialised as a list of
/// [`NumberedIdentity`] (JSON maps cannot have structured keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<NumberedIdentity>", into = "Vec<NumberedIdentity>")]
pub struct Identities {
    numbers: BTreeMap<IdentityLabels, u32>,
}

/// One entry of [`Identities`], as it is serialised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberedIdentity {
    pub id: u32,
    #[serde(flatten)]
    pub labels: IdentityLabels,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentitiesError {
    #[error("identity number {id} ({labels}) is outside {FIRST_WORKLOAD_IDENTITY}..{FIRST_CIDR_IDENTITY}")]
    OutOfRange { id: u32, labels: String },
    #[error("identity number {id} is given to both {first} and {second}")]
    Duplicate { id: u32, first: String, second: String },
    #[error("identity {labels} is numbered twice ({first} and {second})")]
    Renumbered { labels: String, first: u32, second: u32 },
}

fn describe(l: &IdentityLabels) -> String {
    format!("{}/{} {:?}", l.namespace, l.service_account, l.labels)
}

impl Identities {
    /// Checks that every number is in range and given once.
    pub fn new(entries: impl IntoIterator<Item = (IdentityLabels, u32)>) -> Result<Self, IdentitiesError> {
        let mut numbers = BTreeMap::new();
        let mut owners: BTreeMap<u32, IdentityLabels> = BTreeMap::new();
        for (labels, id) in entries {
            if !(FIRST_WORKLOAD_IDENTITY..FIRST_CIDR_IDENTITY).contains(&id) {
                return Err(IdentitiesError::OutOfRange { id, labels: describe(&labels) });
            }
            if let Some(other) = owners.get(&id).filter(|o| **o != labels) {
                return Err(IdentitiesError::Duplicate { id, first: describe(other), second: describe(&labels) });
            }
            if let Some(first) = numbers.get(&labels).copied().filter(|n| *n != id) {
                return Err(IdentitiesError::Renumbered { labels: describe(&labels), first, second: id });
            }
            owners.insert(id, labels.clone());
            numbers.insert(labels, id);
        }
        Ok(Identities { numbers })
    }

    pub fn get(&self, labels: &IdentityLabels) -> Option<u32> {
        self.numbers.get(labels).copied()
    }

    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IdentityLabels, u32)> {
        self.numbers.iter().map(|(l, n)| (l, *n))
    }

    /// The number of each of `wanted` (sorted, distinct): the map's where it has one, else
    /// the next ones above the map's largest (never a number the map gives to another
    /// identity, also one that is not wanted now: removing a workload frees nothing).
    pub fn number(&self, wanted: &BTreeSet<IdentityLabels>) -> BTreeMap<IdentityLabels, u32> {
        let wanted: BTreeSet<&IdentityLabels> = wanted.iter().collect();
        self.number_each(&wanted).into_iter().map(|(l, id)| (l.clone(), id)).collect()
    }

    /// As [`Self::number`], without copying the labels.
    pub fn number_each<'a>(&self, wanted: &BTreeSet<&'a IdentityLabels>) -> BTreeMap<&'a IdentityLabels, u32> {
        let mut next = self.numbers.values().max().map_or(FIRST_WORKLOAD_IDENTITY, |m| m + 1);
        wanted
            .iter()
            .map(|l| {
                let id = self.get(l).unwrap_or_else(|| {
                    // Past the workload range only with 16 million identities; the kernel
                    // would then read such a number as an address block's, so say so loudly.
                    assert!(next < FIRST_CIDR_IDENTITY, "workload identity numbers exhausted");
                    next += 1;
                    next - 1
                });
                (*l, id)
            })
            .collect()
    }
}

impl TryFrom<Vec<NumberedIdentity>> for Identities {
    type Error = IdentitiesError;

    fn try_from(entries: Vec<NumberedIdentity>) -> Result<Self, IdentitiesError> {
        Identities::new(entries.into_iter().map(|e| (e.labels, e.id)))
    }
}

impl From<Identities> for Vec<NumberedIdentity> {
    fn from(ids: Identities) -> Self {
        ids.numbers.into_iter().map(|(labels, id)| NumberedIdentity { id, labels }).collect()
    }
}
