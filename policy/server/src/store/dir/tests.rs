use std::path::PathBuf;
use std::time::Duration;

use super::*;

const NS_A: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n";
const NS_B: &str =
    "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: b}\nspec: {defaultAction: Deny}\n";

fn parse(text: &str) -> Resource {
    load::parse_str(Path::new("t.yaml"), text).unwrap().remove(0).resource
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("palisade-dirstore-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(listing: &Listing) -> Vec<String> {
    listing.resources.iter().map(|l| ResourceKey::of(&l.resource).to_string()).collect()
}

#[tokio::test]
async fn apply_writes_the_managed_directory_atomically_and_refuses_other_files() {
    let dir = TempDir::new("apply");
    std::fs::write(dir.0.join("git.yaml"), NS_A).unwrap();
    let store = DirStore::open(&dir.0, Duration::from_secs(3600)).unwrap();
    let first = store.list().await.unwrap();
    assert_eq!(names(&first), ["Namespace a"]);

    let rev = store.apply(first.revision, vec![Change::Put(parse(NS_B))]).await.unwrap();
    assert!(rev > first.revision);
    assert_eq!(*store.watch().borrow(), rev, "the write is published at once");
    let listing = store.list().await.unwrap();
    assert_eq!(names(&listing), ["Namespace b", "Namespace a"]);
    assert!(listing.resources[0].origin.file.starts_with(dir.0.join(MANAGED)));
    assert_eq!(listing.resources[0].resource, parse(NS_B), "round trip through the file");

    // A stale revision changes nothing.
    let stale = store.apply(first.revision, vec![Change::Delete(ResourceKey::of(&parse(NS_B)))]).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    // A resource of somebody else's file is not ours to change.
    let theirs = store.apply(rev, vec![Change::Delete(ResourceKey::of(&parse(NS_A)))]).await;
    match theirs {
        Err(e @ StoreError::NotManaged { .. }) => assert!(e.to_string().contains("git.yaml"), "{e}"),
        other => panic!("expected NotManaged, got {other:?}"),
    }
    // A batch with one bad change changes nothing.
    let missing = ResourceKey { kind: "Namespace".into(), namespace: None, name: "zzz".into() };
    let batch = vec![Change::Delete(ResourceKey::of(&parse(NS_B))), Change::Delete(missing)];
    assert!(matches!(store.apply(rev, batch).await, Err(StoreError::NotFound { .. })));
    assert_eq!(names(&store.list().await.unwrap()), ["Namespace b", "Namespace a"]);

    let rev2 = store.apply(rev, vec![Change::Delete(ResourceKey::of(&parse(NS_B)))]).await.unwrap();
    assert!(rev2 > rev);
    assert_eq!(names(&store.list().await.unwrap()), ["Namespace a"]);
    let hidden: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".applied-"))
        .collect();
    assert_eq!(hidden.len(), 1, "old generations are removed: {hidden:?}");
}

#[tokio::test]
async fn a_change_behind_the_servers_back_is_a_new_revision() {
    let dir = TempDir::new("watch");
    std::fs::write(dir.0.join("git.yaml"), NS_A).unwrap();
    let store = DirStore::open(&dir.0, Duration::from_millis(20)).unwrap();
    let mut revisions = store.watch();
    let before = *revisions.borrow_and_update();
    std::fs::write(dir.0.join("more.yaml"), NS_B).unwrap();
    tokio::time::timeout(Duration::from_secs(10), revisions.changed()).await.expect("noticed").unwrap();
    let listing = store.list().await.unwrap();
    assert!(listing.revision > before);
    assert_eq!(names(&listing), ["Namespace a", "Namespace b"]);
}

#[test]
fn a_missing_root_is_an_error() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let err = DirStore::open(Path::new("/nonexistent/palisade"), Duration::from_secs(1)).err().expect("refused");
    assert!(err.to_string().contains("/nonexistent/palisade"), "{err}");
}
