//! Palisade's waypoint: the L7 engine. The caller (the `waypoint` binary) terminates HBONE
//! and hands each accepted stream to [`Engine::serve`] with the source's proven identity and
//! the VIP it dialled; the engine detects HTTP/1.1 or HTTP/2, authorizes, routes, balances
//! and forwards through an [`Upstream`], or passes other TCP through to the Service.
pub mod access_log;
pub mod authz;
pub mod balance;
pub mod body;
pub mod detect;
mod engine;
pub mod filters;
mod forward;
pub mod limits;
pub mod metrics;
pub mod outlier;
pub mod pool;
mod proxy;
pub mod retry;
pub mod route;
mod serve;
pub mod trace;
pub mod upstream;

pub use engine::{ConfigError, Downstream, Engine, Settings};
pub use upstream::{BoxedIo, ConnectFuture, Io, PlainTcp, Upstream};
