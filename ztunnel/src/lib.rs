//! Palisade's node agent. See ARCHITECTURE.md for how the parts fit.
pub mod admin;
pub mod config;
pub mod config_client;
pub mod connections;
pub mod datapath;
pub mod enroll;
pub mod flows;
pub mod handoff;
pub mod limits;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod policy_source;
pub mod proxy;
pub mod pushed;

mod app;
pub use app::run;
