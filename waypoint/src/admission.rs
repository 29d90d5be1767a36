//! The destination's L4 policy, checked by the waypoint before it forwards: the waypoint
//! tunnels to an endpoint with its own identity, so the destination's ztunnel sees the
//! waypoint, not the client. The original client's proven identity is known only here, so
//! the waypoint asks, for every endpoint it is about to use, whether that client may reach
//! it — as the destination's ztunnel would have had the client connected directly.
//!
//! Checked per request (HTTP) or per connection (TCP), never per upstream connection:
//! upstream connections are pooled and carry many clients' requests.
use palisade_model::waypoint::config::BackendEndpoint;

use crate::engine::Downstream;

/// Why an endpoint may not be reached by a downstream client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("L4 policy denies the source at {endpoint}: {rule}")]
pub struct Refusal {
    pub endpoint: std::net::SocketAddr,
    /// The rule that decided, as the policy names it (for the access log).
    pub rule: String,
}

pub trait Admission: Send + Sync {
    fn admit(&self, downstream: &Downstream, endpoint: &BackendEndpoint) -> Result<(), Refusal>;
}
