//! Code shared by ztunnel and waypoint: SPIFFE identities, mutual TLS, workload certificates
//! (the CA API and the certificate manager) and HBONE.
pub mod ca_api;
pub mod identity;
pub mod tls;
