//! `palisade serve`: the policy control plane. Resources live in a [`store::Store`] (a
//! directory of YAML, or etcd); the server validates every change as a whole batch before it
//! reaches the store, compiles what each node needs and pushes it to the ztunnels, which ACK
//! or NACK each version.
pub mod store;
