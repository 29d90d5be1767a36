//! The mesh's certificate authority: roots and their rotation, workload signing
//! ([`authority`]), and the node-authorized signing endpoint (`palisade ca serve`, [`server`]).
pub mod authority;
pub mod server;
