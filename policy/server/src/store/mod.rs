//! Where resources are kept. The server validates a change against the whole resource set
//! before it writes it (a store never sees an invalid batch), and learns of changes made
//! behind its back (a `git pull` into the directory, another replica writing to etcd)
//! through [`Store::watch`].
//!
//! The trait is async (`async_trait`, so it can be used as `Arc<dyn Store>`): etcd's client
//! is async, and the directory store does its file work on `spawn_blocking` itself, so the
//! callers never block a runtime thread whichever store they hold.
use async_trait::async_trait;
use palisade_model::compile::{Identities, IdentityLabels};
use palisade_model::load::Located;
use palisade_model::resource::Resource;
use tokio::sync::watch;

pub mod dir;
pub mod etcd;

/// A store's revision: it grows with every change of its content, so a larger revision is a
/// newer content (also across restarts of the server: see each store).
pub type Revision = u64;

pub use palisade_model::key::ResourceKey;

/// Every resource of a store, as read at one revision.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub revision: Revision,
    /// Each with where it is kept (a file and line, or an etcd key), for error messages.
    pub resources: Vec<Located>,
}

/// One change of a batch.
#[derive(Clone, Debug)]
pub enum Change {
    /// Create, or replace the resource with the same [`ResourceKey`].
    Put(Resource),
    /// Remove; a key that does not exist is an error ([`StoreError::NotFound`]).
    Delete(ResourceKey),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store moved since the listing the batch was validated against: list, validate and
    /// try again.
    #[error("the store changed during the request (at revision {expected}, now {actual}); try again")]
    Conflict { expected: Revision, actual: Revision },
    #[error("{key}: not found")]
    NotFound { key: ResourceKey },
    /// The directory store refuses to change a resource it did not write (one that lives in a
    /// file somebody else manages, e.g. a git checkout).
    #[error("{key}: defined in {origin}, which palisade does not manage; edit that file instead")]
    NotManaged { key: ResourceKey, origin: String },
    #[error("{store}: {message}")]
    Backend { store: String, message: String },
}

/// The storage of resources. Implementations: [`dir::DirStore`] (a directory of YAML, the
/// default) and `etcd::EtcdStore`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every resource, with the revision it was read at.
    async fn list(&self) -> Result<Listing, StoreError>;

    /// Writes a batch atomically (all of it or none), if the store is still at `expected`
    /// (the revision of the listing the batch was validated against); otherwise
    /// [`StoreError::Conflict`] and nothing changes. Returns the new revision.
    async fn apply(&self, expected: Revision, changes: Vec<Change>) -> Result<Revision, StoreError>;

    /// The number of each of `wanted` (distinct workload identities), numbering the new ones
    /// and keeping them in the store: a number survives restarts, is never given to another
    /// identity (also after its workloads are gone), and servers sharing a store agree.
    async fn number_identities(&self, wanted: &[IdentityLabels]) -> Result<Identities, StoreError>;

    /// The latest revision, updated whenever the content changes, whoever changed it.
    fn watch(&self) -> watch::Receiver<Revision>;

    /// For logs and `palisade get`: `dir:/etc/palisade`, `etcd:http://…`.
    fn describe(&self) -> String;
}
