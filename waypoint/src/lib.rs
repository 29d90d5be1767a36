//! Palisade's waypoint: the L7 engine. The caller (the `waypoint` binary) terminates HBONE
//! and hands each accepted stream to [`Engine::serve`] with the source's proven identity and
//! the VIP it dialled; the engine detects HTTP/1.1 or HTTP/2, authorizes, routes, balances
//! and forwards through an [`Upstream`], or passes other TCP through to the Service.
//!
//! The binary's parts, around the engine: `app` (flags, start-up, admin `/metrics` and
//! `/ready`, drain), `hbone` (the HBONE listener that feeds the engine, and the HBONE
//! [`Upstream`] through `palisade_mesh`'s pool with the waypoint's own identity), `tunnel` (a
//! CONNECT stream as a byte stream), `policy` (resources loaded, validated and compiled, polled,
//! last good kept; the L4 check) and `admission` (the hook through which the engine asks the
//! destination's L4 policy about the original client before it sends to an endpoint).
//!
//! The path of one connection and one request, by module:
//! - `serve`: engine-wide connection limit (refuse, never queue) → `detect` (h2c preface or
//!   an HTTP/1.1 method, else TCP) → hyper-util's auto server with header size/count, header
//!   read and idle bounds; or the L4 pass-through.
//! - `proxy`: service by destination → `trace` (traceparent) → `authz` (DENY, ALLOW, AUDIT)
//!   → `route` (path, headers, query, method; weighted backend) → `filters` (redirect,
//!   rewrite, header modifiers; mirrors in `forward`) → the backend's `limits` → `forward`:
//!   attempts with `balance` (round robin, P2C least request, ring hash), `outlier`
//!   ejection, `retry` (budget, jittered backoff, bounded replay buffer) and `pool`
//!   (HTTP/1.1 reuse, HTTP/2 multiplexing; the upstream's HTTP version from the Service
//!   port's declared protocol, `preface` telling an HTTP/1.1 endpoint from an HTTP/2 one)
//!   under the route's timeouts → a `body::Tracked` response that holds the request's limit
//!   units until its last byte and then writes the `access_log` line and `metrics`. An
//!   HTTP/1.1 Upgrade leaves for `upgrade` once its backend is chosen; CONNECT gets 501.
//!
//! No tower stack: each step needs what earlier steps decided (the route picks the backend,
//! whose policy picks the balancer, limits and retries), so one async function over small
//! modules reads top to bottom where layers would pass everything through request
//! extensions; the balancer is our own for the reasons in `balance`.
//!
//! Configuration is a snapshot swapped whole by [`Engine::update`]; backends' live state
//! (in-flight counts, ejections, breaker counters) is kept across updates by backend name and
//! endpoint address. Each Backend's own `TrafficPolicy` governs its balancing, limits and
//! outlier detection; `ServiceL7::traffic` is not read (the control plane gives the Service's
//! default backend the same policy).
pub mod access_log;
pub mod admission;
pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod control;
pub mod detect;
mod engine;
pub mod filters;
mod forward;
pub mod hbone;
pub mod limits;
pub mod metrics;
pub mod outlier;
pub mod policy;
pub mod pool;
mod preface;
mod proxy;
pub mod retry;
pub mod route;
mod serve;
pub mod trace;
pub mod tunnel;
mod upgrade;
pub mod upstream;

pub use engine::{ConfigError, Downstream, Engine, Settings};
pub use upstream::{BoxedIo, ConnectFuture, Io, PlainTcp, Upstream};
