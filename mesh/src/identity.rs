//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
pub struct InvalidSpiffeId {
    pub input: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidSpiffeId { input: s.to_string() };
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| valid_segment(p)) => Ok(SpiffeId::new(td, ns, sa)),
            _ => Err(err()),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = InvalidSpiffeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for bad in ["http://x/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns//sa/b", "spiffe://td/ns/a/sa/b/c"] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
