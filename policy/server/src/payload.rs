//! What the nodes are sent: the resource set as one YAML document per resource, keyed by
//! [`ResourceKey`], with the identity numbers and a digest of the whole. A payload is built
//! from the previous one: a document is rendered only when its resource changed, and a node's
//! stream sends only the documents that differ from what the node last ACKed
//! ([`Delta::between`]), so a one-resource change in a 10,000-workload cluster costs one
//! rendering and a merge of two sorted maps, not 20,000 renderings and a 3 MB message.
use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_model::compile::Identities;
use palisade_model::key::ResourceKey;
use palisade_model::load::Located;
use palisade_model::resource::Resource;

use crate::store::Revision;

/// One resource as it is pushed.
#[derive(Debug, PartialEq)]
pub struct Doc {
    pub resource: Resource,
    pub yaml: String,
    /// SHA-256 of `yaml`.
    pub digest: [u8; 32],
    /// SHA-256 of the key and `digest`: this document's share of the set's digest.
    entry: [u8; 32],
}

/// The resource set, by key (sorted: every delta walks two of them side by side). Keys are
/// shared, so a new set that changes one document copies pointers, not 60,000 strings.
pub type Documents = BTreeMap<Arc<ResourceKey>, Arc<Doc>>;

#[derive(Debug)]
pub struct Payload {
    /// The store revision it was computed at, as text (opaque to the nodes).
    pub version: String,
    pub revision: Revision,
    pub documents: Arc<Documents>,
    /// The number of every workload identity of the resources, from the store (so numbers
    /// stay put across recompiles and restarts, and replicas push the same ones).
    pub identities: Arc<Identities>,
    /// SHA-256 of the identities' serialised form (kept to reuse while they do not change).
    identities_digest: [u8; 32],
    /// The XOR of every document's `entry`: a digest of the set that one change updates in
    /// constant time (it detects changes of our own content; it is no defence against a
    /// forger, who would need to write to the store anyway).
    documents_digest: [u8; 32],
    /// SHA-256 of the documents' and the identities' digests, hex: what a node compares to
    /// know it already runs this content.
    pub digest: String,
}

impl Payload {
    /// The payload of a whole set. `previous`: the payload this one follows, whose
    /// identities' digest is reused when the identities are the same.
    pub fn new(
        revision: Revision,
        documents: Arc<Documents>,
        identities: Arc<Identities>,
        previous: Option<&Payload>,
    ) -> Result<Self, String> {
        let mut sum = [0; 32];
        for doc in documents.values() {
            xor(&mut sum, &doc.entry);
        }
        Self::assemble(revision, documents, sum, identities, previous)
    }

    /// `previous` with `changed` put (created or replaced) and `removed` taken out: one
    /// rendering per changed resource, and the set's digest updated by the documents that
    /// left and came.
    pub fn changed(
        previous: &Payload,
        revision: Revision,
        changed: &[&Resource],
        removed: &[ResourceKey],
        identities: Arc<Identities>,
    ) -> Result<Self, String> {
        let mut documents = (*previous.documents).clone();
        let mut sum = previous.documents_digest;
        for key in removed {
            if let Some(old) = documents.remove(key) {
                xor(&mut sum, &old.entry);
            }
        }
        for resource in changed {
            let doc = Arc::new(render(resource)?);
            xor(&mut sum, &doc.entry);
            if let Some(old) = documents.insert(Arc::new(ResourceKey::of(resource)), doc) {
                xor(&mut sum, &old.entry);
            }
        }
        Self::assemble(revision, Arc::new(documents), sum, identities, Some(previous))
    }

    fn assemble(
        revision: Revision,
        documents: Arc<Documents>,
        documents_digest: [u8; 32],
        identities: Arc<Identities>,
        previous: Option<&Payload>,
    ) -> Result<Self, String> {
        let identities_digest = match previous.filter(|p| Arc::ptr_eq(&p.identities, &identities)) {
            Some(p) => p.identities_digest,
            None => sha256(&serde_json::to_vec(&*identities).map_err(|e| format!("cannot serialise identities: {e}"))?),
        };
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&documents_digest);
        // Numbers move nothing in the YAML, but they are content: a node must recompile for them.
        context.update(&identities_digest);
        let digest = context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Payload {
            version: revision.to_string(),
            revision,
            documents,
            identities,
            identities_digest,
            documents_digest,
            digest,
        })
    }
}

fn xor(sum: &mut [u8; 32], entry: &[u8; 32]) {
    sum.iter_mut().zip(entry).for_each(|(s, e)| *s ^= e);
}

pub fn render(resource: &Resource) -> Result<Doc, String> {
    let key = ResourceKey::of(resource);
    let yaml = serde_yaml::to_string(resource).map_err(|e| format!("{key}: cannot serialise: {e}"))?;
    let digest = sha256(yaml.as_bytes());
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [key.kind.as_str(), key.namespace.as_deref().unwrap_or(""), key.name.as_str()] {
        context.update(part.as_bytes());
        context.update(b"\0");
    }
    context.update(&digest);
    let mut entry = [0; 32];
    entry.copy_from_slice(context.finish().as_ref());
    Ok(Doc { resource: resource.clone(), yaml, digest, entry })
}

/// The documents of `resources`, reusing `previous`'s where the resource is unchanged.
pub fn documents(resources: &[Located], previous: Option<&Documents>) -> Result<Documents, String> {
    let mut out = Documents::new();
    for located in resources {
        let key = ResourceKey::of(&located.resource);
        let doc = match previous.and_then(|p| p.get(&key)) {
            Some(doc) if doc.resource == located.resource => doc.clone(),
            _ => Arc::new(render(&located.resource)?),
        };
        out.insert(Arc::new(key), doc);
    }
    Ok(out)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// What one response carries: the whole set (`full`), or what changed since the set a node
/// ACKed.
#[derive(Debug, Default)]
pub struct Delta {
    pub full: bool,
    pub put: Vec<(Arc<ResourceKey>, Arc<Doc>)>,
    pub removed: Vec<Arc<ResourceKey>>,
}

impl Delta {
    /// From `acked` (what the node has in force, as this stream knows it; `None`: unknown,
    /// send everything) to `now`: one walk of both sorted sets side by side, where unchanged
    /// documents are the same `Arc`.
    pub fn between(acked: Option<&Documents>, now: &Documents) -> Delta {
        let Some(acked) = acked else {
            return Delta {
                full: true,
                put: now.iter().map(|(k, d)| (k.clone(), d.clone())).collect(),
                removed: vec![],
            };
        };
        let mut delta = Delta::default();
        let (mut old, mut new) = (acked.iter().peekable(), now.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((k, _)), None) => {
                    delta.removed.push((*k).clone());
                    old.next();
                }
                (None, Some((k, d))) => {
                    delta.put.push(((*k).clone(), (*d).clone()));
                    new.next();
                }
                (Some((ko, dold)), Some((kn, dnew))) => match ko.cmp(kn) {
                    std::cmp::Ordering::Less => {
                        delta.removed.push((*ko).clone());
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        delta.put.push(((*kn).clone(), (*dnew).clone()));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(dold, dnew) && dold.digest != dnew.digest {
                            delta.put.push(((*kn).clone(), (*dnew).clone()));
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Located> {
        palisade_model::load::parse_str(std::path::Path::new("t.yaml"), text).unwrap()
    }

    const A: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n";
    const B: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: b}\n";

    #[test]
    fn deltas_carry_only_what_changed_and_reuse_unchanged_documents() {
        let first = documents(&parse(&format!("{A}---\n{B}")), None).unwrap();
        let full = Delta::between(None, &first);
        assert!(full.full && full.put.len() == 2 && full.removed.is_empty());

        // b changes its labels, a stays, c appears.
        let text = format!(
            "{A}---\n{}---\napiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {{name: c}}\n",
            B.replace("{name: b}", "{name: b, labels: {team: x}}")
        );
        let second = documents(&parse(&text), Some(&first)).unwrap();
        let a = ResourceKey { kind: "Namespace".into(), namespace: None, name: "a".into() };
        assert!(Arc::ptr_eq(&first[&a], &second[&a]), "an unchanged resource is not rendered again");
        let delta = Delta::between(Some(&first), &second);
        let names: Vec<&str> = delta.put.iter().map(|(k, _)| k.name.as_str()).collect();
        assert!(!delta.full);
        assert_eq!(names, ["b", "c"]);
        assert!(delta.put[0].1.yaml.contains("team: x"));

        // a is removed.
        let none = Arc::new(Identities::default());
        let payload = Payload::new(2, Arc::new(second.clone()), none.clone(), None).unwrap();
        let third = Payload::changed(&payload, 3, &[], std::slice::from_ref(&a), none.clone()).unwrap();
        let delta = Delta::between(Some(&second), &third.documents);
        assert!(delta.put.is_empty());
        assert_eq!(delta.removed, [Arc::new(a)]);
        // The digest updated by the change equals the digest of the set computed whole.
        let whole = Payload::new(3, third.documents.clone(), none, None).unwrap();
        assert_eq!(third.digest, whole.digest);
        assert_ne!(third.digest, payload.digest);
    }

    #[test]
    fn the_digest_covers_documents_and_numbers() {
        let docs = Arc::new(documents(&parse(A), None).unwrap());
        let none = Arc::new(Identities::default());
        let one = Payload::new(1, docs.clone(), none.clone(), None).unwrap();
        let two = Payload::new(2, docs.clone(), none, Some(&one)).unwrap();
        assert_eq!(one.digest, two.digest, "the revision is not content");
        let labels = palisade_model::compile::IdentityLabels {
            namespace: "a".into(),
            service_account: "s".into(),
            labels: Default::default(),
        };
        let numbered = Arc::new(Identities::new([(labels, 300)]).unwrap());
        assert_ne!(one.digest, Payload::new(1, docs, numbered, Some(&one)).unwrap().digest);
    }
}
