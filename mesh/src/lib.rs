//! Code shared by ztunnel and waypoint: SPIFFE identities, mutual TLS, workload certificates
//! (the CA API, its client and the certificate manager) and HBONE.
pub mod accept;
pub mod ca_api;
pub mod ca_client;
pub mod hbone;
pub mod identity;
pub mod logging;
pub mod secrets;
pub mod signal;
pub mod tls;
