//! Load balancing over one backend's endpoints: round robin, least request with power of two
//! choices, and a consistent-hash ring.
//!
//! This is a small balancer of our own rather than `tower::balance::p2c`: tower's balancer
//! owns a `Service` per endpoint fed by a `Discover` stream and chooses before it sees the
//! request, while we need the request's hash key (ring hash), the endpoints a retry already
//! tried (to go elsewhere), outlier ejection (to hide endpoints) and endpoint state that
//! survives configuration updates. All of that is a table of [`EndpointState`] behind one
//! snapshot lock, read per pick.
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use palisade_model::waypoint::config::{Backend, BackendEndpoint, LoadBalancer, TrafficPolicy};
use rand::Rng;

use crate::limits::Counters;
use crate::outlier::{Outcome, Outlier};

/// Points per endpoint on the hash ring: enough that keys spread within a few percent of even
/// and that adding one of N+1 endpoints moves close to 1/(N+1) of them.
const RING_POINTS: usize = 160;

/// One endpoint and what the waypoint knows of it.
#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: BackendEndpoint,
    /// `endpoint.workload` and `endpoint.identity`, shared with the access records.
    pub workload: Arc<str>,
    pub identity: Arc<str>,
    /// Requests in flight to it (least request's load measure).
    active: AtomicU32,
    pub outlier: Outlier,
}

impl EndpointState {
    fn new(endpoint: BackendEndpoint) -> Self {
        EndpointState {
            workload: endpoint.workload.as_str().into(),
            identity: endpoint.identity.as_str().into(),
            endpoint,
            active: AtomicU32::new(0),
            outlier: Outlier::default(),
        }
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct Table {
    endpoints: Vec<Arc<EndpointState>>,
    /// `0..endpoints.len()`: the candidates when every endpoint is usable (the common case,
    /// which then allocates nothing).
    every: Vec<usize>,
    /// Sorted (hash, index into `endpoints`); empty unless the policy is ring hash.
    ring: Vec<(u64, usize)>,
    traffic: Arc<TrafficPolicy>,
}

/// One backend (a Service port): its endpoints, policy and circuit-breaker counters.
#[derive(Debug)]
pub struct BackendState {
    pub name: Arc<str>,
    table: RwLock<Arc<Table>>,
    pub counters: Arc<Counters>,
    next: AtomicUsize,
}

impl BackendState {
    pub fn new(backend: &Backend) -> Self {
        let state = BackendState {
            name: backend.name.as_str().into(),
            table: RwLock::default(),
            counters: Arc::default(),
            next: AtomicUsize::new(0),
        };
        state.update(backend);
        state
    }

    /// Installs a new endpoint list and policy. Endpoints that stay keep their state
    /// (in-flight counts, ejections); requests in flight hold their own `Arc` and finish
    /// undisturbed on endpoints that left.
    pub fn update(&self, backend: &Backend) {
        let old = self.table();
        let by_addr: HashMap<SocketAddr, &Arc<EndpointState>> =
            old.endpoints.iter().map(|e| (e.endpoint.address, e)).collect();
        let endpoints: Vec<Arc<EndpointState>> = backend
            .endpoints
            .iter()
            .map(|ep| match by_addr.get(&ep.address) {
                Some(existing) if existing.endpoint == *ep => Arc::clone(existing),
                _ => Arc::new(EndpointState::new(ep.clone())),
            })
            .collect();
        let ring = match backend.traffic.load_balancer {
            LoadBalancer::RingHash(_) => build_ring(&endpoints),
            _ => Vec::new(),
        };
        let every = (0..endpoints.len()).collect();
        let table = Arc::new(Table { endpoints, every, ring, traffic: Arc::new(backend.traffic.clone()) });
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    fn table(&self) -> Arc<Table> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The policy in force, shared: requests read it, they do not copy it.
    pub fn traffic(&self) -> Arc<TrafficPolicy> {
        Arc::clone(&self.table().traffic)
    }

    pub fn endpoints(&self) -> Vec<Arc<EndpointState>> {
        self.table().endpoints.clone()
    }

    /// Chooses an endpoint. `key` is the request's hash (ring hash only; None: any
    /// endpoint); `exclude` are endpoints this request already tried. Ejected and excluded
    /// endpoints are skipped while others remain; when none remain, every endpoint is a
    /// candidate again (Envoy's panic mode: better a doubtful endpoint than certain failure).
    pub fn pick(&self, key: Option<u64>, exclude: &[SocketAddr]) -> Option<Arc<EndpointState>> {
        let table = self.table();
        if table.endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        let healthy = |e: &EndpointState| !e.outlier.is_ejected(now);
        let fresh = |e: &EndpointState| !exclude.contains(&e.endpoint.address);
        let usable: Cow<'_, [usize]> = if table.endpoints.iter().all(|e| healthy(e) && fresh(e)) {
            Cow::Borrowed(&table.every)
        } else {
            let mut some: Vec<usize> = table
                .every
                .iter()
                .copied()
                .filter(|&i| healthy(&table.endpoints[i]) && fresh(&table.endpoints[i]))
                .collect();
            if some.is_empty() {
                some = table.every.iter().copied().filter(|&i| healthy(&table.endpoints[i])).collect();
            }
            if some.is_empty() {
                some.clone_from(&table.every);
            }
            Cow::Owned(some)
        };
        let chosen = match (&table.traffic.load_balancer, key) {
            (LoadBalancer::RingHash(_), Some(key)) => ring_lookup(&table.ring, key, &usable),
            (LoadBalancer::LeastRequest, _) => least_request(&table.endpoints, &usable),
            (LoadBalancer::RingHash(_), None) => usable[rand::rng().random_range(0..usable.len())],
            (LoadBalancer::RoundRobin, _) => usable[self.next.fetch_add(1, Ordering::Relaxed) % usable.len()],
        };
        Some(Arc::clone(&table.endpoints[chosen]))
    }

    /// Feeds an attempt's outcome to outlier detection; ejects the endpoint if its threshold
    /// is reached and the max ejection percent allows one more ejection. Returns whether it
    /// ejected.
    pub fn record(&self, endpoint: &EndpointState, outcome: Outcome) -> bool {
        let table = self.table();
        let Some(policy) = &table.traffic.outlier else { return false };
        let now = Instant::now();
        if !endpoint.outlier.record(outcome, policy, now) {
            return false;
        }
        let total = table.endpoints.len();
        let ejected = table.endpoints.iter().filter(|e| e.outlier.is_ejected(now)).count();
        if ejected + 1 > max_ejections(total, policy.max_ejection_percent) {
            endpoint.outlier.forgive();
            return false;
        }
        let time = endpoint.outlier.eject(policy, now);
        tracing::info!(backend = %self.name, endpoint = %endpoint.endpoint.address, ?time, "outlier ejected");
        true
    }
}

/// How many of `total` endpoints may be ejected at once: the percentage rounded down, but at
/// least one when the percentage is not zero (Envoy's rule), so small backends can still shed
/// a bad endpoint.
fn max_ejections(total: usize, percent: u32) -> usize {
    if percent == 0 {
        return 0;
    }
    (total * percent.min(100) as usize / 100).max(1)
}

/// Power of two choices: two distinct random candidates, the one with fewer requests in
/// flight wins. Nearly as good as scanning all endpoints, without herding every request onto
/// the single least-loaded one.
fn least_request(endpoints: &[Arc<EndpointState>], usable: &[usize]) -> usize {
    if usable.len() == 1 {
        return usable[0];
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..usable.len());
    let mut b = rng.random_range(0..usable.len() - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (usable[a], usable[b]);
    if endpoints[b].active() < endpoints[a].active() { b } else { a }
}

fn build_ring(endpoints: &[Arc<EndpointState>]) -> Vec<(u64, usize)> {
    let mut ring = Vec::with_capacity(endpoints.len() * RING_POINTS);
    for (index, ep) in endpoints.iter().enumerate() {
        // Points depend on the endpoint's address only, never on its position in the list,
        // so adding or removing one endpoint leaves every other endpoint's points in place.
        let name = ep.endpoint.address.to_string();
        for point in 0..RING_POINTS {
            ring.push((hash64(format!("{name}#{point}").as_bytes()), index));
        }
    }
    ring.sort_unstable();
    ring
}

/// The first point at or after `key` (wrapping) whose endpoint is usable.
fn ring_lookup(ring: &[(u64, usize)], key: u64, usable: &[usize]) -> usize {
    let start = ring.partition_point(|&(h, _)| h < key);
    (0..ring.len()).map(|i| ring[(start + i) % ring.len()].1).find(|index| usable.contains(index)).unwrap_or(usable[0])
}

/// A stable 64-bit hash (FNV-1a with a final avalanche). Stable across processes and
/// releases, unlike `std`'s hasher, so every waypoint replica maps a key to the same endpoint.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_model::waypoint::config::HashKey;

    fn backend(n: u16, lb: LoadBalancer) -> Backend {
        Backend {
            name: "ns/svc:80".into(),
            endpoints: (0..n)
                .map(|i| BackendEndpoint {
                    workload: format!("ns/w{i}"),
                    address: SocketAddr::from(([10, 0, 0, 1 + i as u8], 8080)),
                    identity: "spiffe://td/ns/ns/sa/w".into(),
                })
                .collect(),
            traffic: TrafficPolicy { load_balancer: lb, ..Default::default() },
            protocol: Default::default(),
        }
    }

    #[test]
    fn ring_moves_about_one_in_n_plus_one() {
        let lb = LoadBalancer::RingHash(HashKey::SourceIp);
        let state = BackendState::new(&backend(4, lb.clone()));
        let keys: Vec<u64> = (0..4000).map(|k| hash64(format!("user-{k}").as_bytes())).collect();
        let before: Vec<SocketAddr> =
            keys.iter().map(|&k| state.pick(Some(k), &[]).unwrap().endpoint.address).collect();
        state.update(&backend(5, lb));
        let added = SocketAddr::from(([10, 0, 0, 5], 8080));
        let mut moved = 0;
        for (k, was) in keys.iter().zip(&before) {
            let now = state.pick(Some(*k), &[]).unwrap().endpoint.address;
            if now != *was {
                assert_eq!(now, added, "a key only moves to the new endpoint");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        assert!((0.12..0.28).contains(&fraction), "moved {fraction}, expected about 0.2");
    }

    #[test]
    fn max_ejections_rounds_down_but_allows_one() {
        assert_eq!(max_ejections(2, 10), 1);
        assert_eq!(max_ejections(10, 50), 5);
        assert_eq!(max_ejections(3, 0), 0);
    }
}
