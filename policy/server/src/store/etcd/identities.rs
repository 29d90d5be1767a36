//! Numeric identities kept in etcd, so they survive restarts of every replica and two replicas
//! never give two numbers to one identity, nor one number to two identities.
//!
//! `/palisade/identities/<namespace>/<service account>/<hash of the labels>` holds the number
//! and the whole identity (the hash only spreads keys; the value says what it is, and a second
//! identity with the same hash takes `<hash>-1`). `/palisade/identity-next` holds the next
//! free number. New numbers are taken in one transaction that succeeds only if the counter and
//! the new keys are as read: a replica that loses the race reads again and finds the numbers
//! the winner gave. Numbers are never reused (an identity whose workloads are gone keeps its
//! number, so a workload that comes back gets it again); reclaiming them is future work.
use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use palisade_model::compile::{FIRST_CIDR_IDENTITY, FIRST_WORKLOAD_IDENTITY, IdentityLabels};
use serde::{Deserialize, Serialize};

use super::EtcdStore;
use crate::store::StoreError;

pub const IDENTITIES: &str = "/palisade/identities/";
pub const NEXT: &str = "/palisade/identity-next";
/// New identities per transaction, well under etcd's default `--max-txn-ops` (128).
const CHUNK: usize = 60;
/// Lost races before giving up (each loss means another replica made progress).
const ATTEMPTS: usize = 50;

/// What a key holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: u32,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
}

impl Stored {
    fn labels(&self) -> IdentityLabels {
        IdentityLabels {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// FNV-1a over the labels: stable across builds and machines (std's hasher is not).
fn labels_hash(labels: &BTreeMap<String, String>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for byte in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// Every allocated identity, and which keys are taken.
struct Table {
    numbers: BTreeMap<IdentityLabels, u32>,
    keys: BTreeMap<String, IdentityLabels>,
}

impl EtcdStore {
    /// Every identity numbered so far.
    pub async fn identities(&self) -> Result<BTreeMap<IdentityLabels, u32>, StoreError> {
        Ok(self.identity_table().await?.numbers)
    }

    /// The number of each of `wanted`, numbering the new ones (from
    /// [`FIRST_WORKLOAD_IDENTITY`] up, in the order given). A number once given stays.
    pub async fn assign_identities(
        &self,
        wanted: &[IdentityLabels],
    ) -> Result<BTreeMap<IdentityLabels, u32>, StoreError> {
        let mut table = self.identity_table().await?;
        let mut attempts = 0;
        loop {
            let missing: Vec<&IdentityLabels> = {
                let mut seen = std::collections::BTreeSet::new();
                wanted.iter().filter(|l| !table.numbers.contains_key(*l) && seen.insert(*l)).collect()
            };
            let Some(chunk) = missing.chunks(CHUNK).next() else { break };
            if !self.allocate(&table, chunk).await? {
                attempts += 1;
                if attempts >= ATTEMPTS {
                    return Err(self.backend(format!(
                        "could not number {} new identities: {ATTEMPTS} transactions lost to other writers",
                        missing.len()
                    )));
                }
            }
            // Read again after every transaction, won or lost: the other replica's numbers
            // are what a lost race is resolved with.
            table = self.identity_table().await?;
        }
        Ok(wanted.iter().filter_map(|l| table.numbers.get(l).map(|n| (l.clone(), *n))).collect())
    }

    async fn identity_table(&self) -> Result<Table, StoreError> {
        let response = self
            .client()
            .get(IDENTITIES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.backend(format!("cannot read {IDENTITIES}: {e}")))?;
        let mut table = Table { numbers: BTreeMap::new(), keys: BTreeMap::new() };
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let stored: Stored = serde_yaml::from_slice(kv.value())
                .map_err(|e| self.backend(format!("etcd:{key}: not an identity: {e}")))?;
            let labels = stored.labels();
            table.numbers.insert(labels.clone(), stored.id);
            table.keys.insert(key, labels);
        }
        Ok(table)
    }

    /// One transaction numbering `chunk`; false when another writer got there first.
    async fn allocate(&self, table: &Table, chunk: &[&IdentityLabels]) -> Result<bool, StoreError> {
        let mut client = self.client();
        let counter = client.get(NEXT, None).await.map_err(|e| self.backend(format!("cannot read {NEXT}: {e}")))?;
        let (next, counter_revision) = match counter.kvs().first() {
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value());
                let next: u32 = text
                    .trim()
                    .parse()
                    .map_err(|e| self.backend(format!("etcd:{NEXT}: {text:?} is not a number: {e}")))?;
                (next, kv.mod_revision())
            }
            None => (FIRST_WORKLOAD_IDENTITY, 0),
        };
        let end = next.checked_add(chunk.len() as u32).filter(|e| *e <= FIRST_CIDR_IDENTITY).ok_or_else(|| {
            self.backend(format!("identity numbers exhausted: {next} + {} passes {FIRST_CIDR_IDENTITY}", chunk.len()))
        })?;
        let mut compares = vec![Compare::mod_revision(NEXT, CompareOp::Equal, counter_revision)];
        let mut puts = Vec::with_capacity(chunk.len() + 1);
        let mut taken: Vec<String> = Vec::new();
        for (labels, id) in chunk.iter().zip(next..) {
            let key = self.free_key(table, &taken, labels)?;
            let stored = Stored {
                id,
                namespace: labels.namespace.clone(),
                service_account: labels.service_account.clone(),
                labels: labels.labels.clone(),
            };
            let text = serde_yaml::to_string(&stored).map_err(|e| self.backend(format!("etcd:{key}: {e}")))?;
            compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(key.clone(), text, None));
            taken.push(key);
        }
        puts.push(TxnOp::put(NEXT, end.to_string(), None));
        let response = client
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .map_err(|e| self.backend(format!("cannot number identities: {e}")))?;
        Ok(response.succeeded())
    }

    /// `<ns>/<sa>/<hash>`, or `<hash>-<n>` when another identity holds that key.
    fn free_key(&self, table: &Table, taken: &[String], labels: &IdentityLabels) -> Result<String, StoreError> {
        for part in [("namespace", &labels.namespace), ("service account", &labels.service_account)] {
            if part.1.is_empty() || part.1.contains(['/', '\0']) {
                return Err(self.backend(format!("{} {:?} cannot be part of an etcd key", part.0, part.1)));
            }
        }
        let base =
            format!("{IDENTITIES}{}/{}/{}", labels.namespace, labels.service_account, labels_hash(&labels.labels));
        (0..)
            .map(|n| if n == 0 { base.clone() } else { format!("{base}-{n}") })
            .find(|key| !table.keys.contains_key(key) && !taken.contains(key))
            .ok_or_else(|| self.backend("no free identity key"))
    }
}
