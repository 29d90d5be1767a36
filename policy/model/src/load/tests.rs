use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::*;

const NS_A: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n";
const NS_B: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: b}\n";

/// A scratch directory under the system's temp dir, unique to the test, removed on drop
/// (also when the test panics).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("palisade-load-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(resources: &[Located]) -> Vec<String> {
    resources.iter().map(|r| r.resource.metadata().name.clone()).collect()
}

#[test]
fn errors_name_file_line_and_field() {
    let text = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: p, namespace: a}\n\
                spec:\n  action: Allw\n  rules: []\n";
    let err = parse_str(Path::new("p.yaml"), text).unwrap_err().to_string();
    assert!(err.starts_with("p.yaml:9: "), "{err}");
    assert!(err.contains("Allw"), "{err}");
}

#[test]
fn unknown_field_is_named() {
    let text = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\nspec:\n  defaultActon: Deny\n";
    let err = parse_str(Path::new("n.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("defaultActon") && err.starts_with("n.yaml:5"), "{err}");
}

#[test]
fn wrong_api_version_is_refused() {
    // (`v1` is Kubernetes' own Namespace, accepted; `v2` is no one's.)
    let text = "apiVersion: v2\nkind: Namespace\nmetadata: {name: a}\n";
    let err = parse_str(Path::new("n.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("apiVersion"), "{err}");
}

#[test]
fn a_separator_may_carry_a_comment_or_the_first_node() {
    let text = format!(
        "--- # first\n{NS_A}---   # second\n{NS_B}...\n--- {{apiVersion: palisade.dev/v1alpha1, kind: Namespace, metadata: {{name: c}}}}\n"
    );
    let loaded = parse_str(Path::new("s.yaml"), &text).unwrap();
    assert_eq!(names(&loaded), ["a", "b", "c"]);
    assert_eq!(loaded.iter().map(|r| r.origin.line).collect::<Vec<_>>(), [2, 6, 10]);
    // `---x` is not a separator: it stays an error in the document, with its line.
    let err = parse_str(Path::new("s.yaml"), &format!("{NS_A}---x\n")).unwrap_err().to_string();
    assert!(err.starts_with("s.yaml:"), "{err}");
}

#[test]
fn a_configmap_mount_loads_its_visible_files_once() {
    // What the kubelet makes of a ConfigMap with keys a.yaml and b.yaml.
    let dir = Scratch::new("configmap");
    let data = "..2026_11_25_13_00_00.123456789";
    dir.write(&format!("{data}/a.yaml"), NS_A);
    dir.write(&format!("{data}/b.yaml"), NS_B);
    symlink(data, dir.0.join("..data")).unwrap();
    symlink("..data/a.yaml", dir.0.join("a.yaml")).unwrap();
    symlink("..data/b.yaml", dir.0.join("b.yaml")).unwrap();
    // A plain subdirectory is walked; a hidden one is not.
    dir.write("team/c.yaml", "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: c}\n");
    dir.write(".git/d.yaml", "not: [loaded");
    dir.write("README.md", "not yaml");

    let files = policy_files(std::slice::from_ref(&dir.0)).unwrap();
    assert_eq!(files, [dir.0.join("a.yaml"), dir.0.join("b.yaml"), dir.0.join("team/c.yaml")]);
    let loaded = load_paths(std::slice::from_ref(&dir.0)).unwrap();
    assert_eq!(names(&loaded), ["a", "b", "c"]);
    assert_eq!(loaded[0].origin.file, dir.0.join("a.yaml"));

    // The kubelet's update: a new timestamped directory, then `..data` swapped to it.
    let next = "..2026_11_25_13_05_00.987654321";
    dir.write(&format!("{next}/a.yaml"), NS_A.replace("name: a", "name: a2").as_str());
    dir.write(&format!("{next}/b.yaml"), NS_B);
    let mut changes = ChangeDetector::new(vec![dir.0.clone()]);
    assert!(changes.poll().unwrap(), "the first poll reports the input");
    assert!(!changes.poll().unwrap());
    symlink(next, dir.0.join("..data.tmp")).unwrap();
    std::fs::rename(dir.0.join("..data.tmp"), dir.0.join("..data")).unwrap();
    assert!(changes.poll().unwrap(), "the swap of ..data is a change");
    assert_eq!(names(&load_paths(std::slice::from_ref(&dir.0)).unwrap()), ["a2", "b", "c"]);
}

#[test]
fn a_symlink_loop_is_walked_once_and_a_dangling_yaml_link_is_named() {
    let dir = Scratch::new("loop");
    dir.write("a.yaml", NS_A);
    symlink(&dir.0, dir.0.join("again")).unwrap();
    assert_eq!(names(&load_paths(std::slice::from_ref(&dir.0)).unwrap()), ["a"]);
    symlink("gone.yaml", dir.0.join("b.yaml")).unwrap();
    let err = load_paths(std::slice::from_ref(&dir.0)).unwrap_err().to_string();
    assert!(err.contains(&*dir.0.join("b.yaml").to_string_lossy()), "{err}");
}

#[test]
fn an_oversized_file_is_refused_before_it_is_read() {
    let dir = Scratch::new("size");
    let big = dir.0.join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    // Sparse: no disk is used, the size alone must be enough to refuse it.
    f.set_len(MAX_FILE_BYTES + 1).unwrap();
    let err = load_paths(std::slice::from_ref(&big)).unwrap_err();
    assert!(matches!(err, LoadError::TooLarge { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("big.yaml") && text.contains("8 MiB"), "{text}");
}

#[test]
fn an_endless_device_is_refused_without_reading_it_all() {
    let err = load_paths(&[PathBuf::from("/dev/zero")]).unwrap_err().to_string();
    assert!(err.starts_with("/dev/zero: refused: larger than the limit"), "{err}");
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    // 200 KB of brackets after a valid start: serde_yaml alone takes minutes over this.
    let deep = format!("{NS_A}x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let err = parse_str(Path::new("deep.yaml"), &deep).unwrap_err().to_string();
    assert_eq!(err, "deep.yaml:4: refused: YAML nested deeper than the limit of 64 levels");
    // Block nesting counts too, and the line where the limit is passed is named.
    let mut block = String::new();
    for i in 0..70 {
        block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    let err = parse_str(Path::new("block.yaml"), &block).unwrap_err().to_string();
    assert_eq!(err, "block.yaml:65: refused: YAML nested deeper than the limit of 64 levels");
    let dashes = format!("{}x\n", "- ".repeat(70));
    assert!(matches!(parse_str(Path::new("d.yaml"), &dashes), Err(LoadError::TooDeep { line: 1, .. })));
    // Brackets inside quotes, comments and block scalars are text.
    let text = format!(
        "{NS_A}spec:\n  defaultAction: Allow # {}\n---\napiVersion: palisade.dev/v1alpha1\nkind: Namespace\n\
         metadata:\n  name: b\n  labels:\n    x: '{}'\n    y: \"{}\"\n    z: |\n      {}\n",
        "[".repeat(80),
        "{".repeat(80),
        "[".repeat(80),
        "[".repeat(80)
    );
    let err = parse_str(Path::new("q.yaml"), &text).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!err.contains("nested deeper"), "{err}");
}

#[test]
fn too_many_documents_are_refused_with_the_line() {
    let text = "---\n".repeat(MAX_DOCUMENTS + 5);
    let err = parse_str(Path::new("many.yaml"), &text).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "many.yaml:{}: refused: more than the limit of {MAX_DOCUMENTS} YAML documents in one file",
            MAX_DOCUMENTS + 1
        )
    );
}

#[test]
fn unchanged_files_are_not_reported_and_a_missing_one_is_named() {
    let dir = Scratch::new("changes");
    let a = dir.write("a.yaml", NS_A);
    let mut changes = ChangeDetector::new(vec![dir.0.clone()]);
    assert!(changes.poll().unwrap());
    assert!(!changes.poll().unwrap());
    // Same size, rewritten within the file system's timestamp granularity: still seen.
    std::fs::write(&a, NS_A.replace("name: a", "name: z")).unwrap();
    assert!(changes.poll().unwrap());
    symlink("gone.yaml", dir.0.join("b.yaml")).unwrap();
    let err = changes.poll().unwrap_err().to_string();
    assert!(err.contains("b.yaml"), "{err}");
    std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
    assert!(!changes.poll().unwrap(), "back as it was: no change");
}

#[test]
fn a_batch_reports_every_problem_of_every_document_at_its_field() {
    let text = "\
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: p, namespace: a}
spec:
  action: Allow
  colour: blue
  rules:
  - ports: [80, 70000, 99999]
  - from: [{namespace: b, bogus: 1}]
    ports: [-1]
---
apiVersion: palisade.dev/v1alpha1
kind: Gadget
metadata: {name: g}
---
apiVersion: palisade.dev/v1alpha2
kind: Namespace
metadata: {name: ok}
---
apiVersion: palisade.dev/v1alpha1
kind: Namespace
metadata: {name: fine}
";
    let mut batch = Batch::default();
    parse_into(&mut batch, Path::new("b.yaml"), text);
    let got: Vec<(usize, &str)> = batch.findings.iter().map(|f| (f.line, f.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (6, "spec.colour"),
            (8, "spec.rules[0].ports[1]"),
            // Found after ports[1] was removed: named with its original index.
            (8, "spec.rules[0].ports[2]"),
            (9, "spec.rules[1].from[0].bogus"),
            (10, "spec.rules[1].ports[0]"),
            (13, "kind"),
            (16, "apiVersion"),
        ],
        "{:#?}",
        batch.findings
    );
    assert!(batch.findings[1].message.contains("70000"), "{}", batch.findings[1]);
    assert!(batch.findings[2].message.contains("99999"), "{}", batch.findings[2]);
    assert_eq!(names(&batch.resources), ["fine"]);
    // Positions of any field of a loaded document stay available to later checks.
    let fine = &batch.resources[0].origin;
    assert_eq!(batch.sources.locate(fine, "metadata.name").line, 22);
}

#[test]
fn a_batch_goes_on_past_an_unreadable_or_refused_file() {
    let dir = Scratch::new("batch");
    dir.write("a.yaml", &"[".repeat(100));
    dir.write("b.yaml", "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: b, colour: red}\n");
    dir.write("c.yaml", NS_A);
    let batch = load_batch(std::slice::from_ref(&dir.0)).unwrap();
    let got: Vec<String> = batch.findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got[0].contains("a.yaml:1: refused: YAML nested deeper"), "{got:#?}");
    assert!(got[1].contains("b.yaml:3: Namespace b: metadata.colour: unknown field"), "{got:#?}");
    assert_eq!(names(&batch.resources), ["a"]);
}
