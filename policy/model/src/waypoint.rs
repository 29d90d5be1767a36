//! The L7 half of the model: the resources a waypoint enforces and what they compile to.
pub mod config;
