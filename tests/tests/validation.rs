//! Validation as users meet it: `palisade validate` on files names every problem of a batch
//! with its file, line and field (warnings beside errors, only errors fail), and a policy that
//! ztunnel rejects is visible in its `/config_dump` (when, why at which file:line, which
//! generation stayed) and counted in its metrics.
mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_sandbox::{Cluster, ClusterSpec};
use serde_json::Value;
use support::*;

/// Far above what validating a few documents takes; only stops a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The namespace and workload every table case starts from (8 lines, then `---`).
const BASE: &str = "\
apiVersion: palisade.dev/v1alpha1
kind: Namespace
metadata: {name: shop}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop}
spec: {serviceAccount: web, node: node-1, addresses: [10.9.0.1], labels: {app: web}}
---
";
/// Line of the case document's first line (after [`BASE`]).
const CASE: usize = 10;

const POLICY: &str =
    "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: p, namespace: shop}\n";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("plsd-validation-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `palisade validate PATH`: (success, stdout, stderr).
fn validate(path: &Path) -> (bool, String, String) {
    let bin = palisade_sandbox::workspace_bin("palisade").expect("palisade binary");
    let mut child = Command::new(bin)
        .arg("validate")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run palisade validate");
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    // Read while it runs, so a long report cannot fill a pipe and stall it.
    let out = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        pipes.0.read_to_string(&mut o).unwrap();
        pipes.1.read_to_string(&mut e).unwrap();
        (o, e)
    });
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("palisade validate {} did not finish", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = out.join().unwrap();
    (status.success(), stdout, stderr)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Sev {
    Error,
    Warning,
}

#[test]
fn each_bad_input_is_named_with_its_file_line_and_field() {
    use Sev::*;
    // (case, document after BASE, severity, line within the document (1 = its first), field)
    let table: &[(&str, String, Sev, usize, &str)] = &[
        ("wrong kind", "apiVersion: palisade.dev/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n".into(), Error, 2, "kind"),
        (
            "missing name",
            "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {namespace: shop}\nspec: {action: Deny}\n"
                .into(),
            Error,
            3,
            "metadata.name",
        ),
        ("bad action", format!("{POLICY}spec:\n  action: Maybe\n  rules: [{{}}]\n"), Error, 5, "spec.action"),
        (
            "bad port",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - ports: [http]\n"),
            Error,
            7,
            "spec.rules[0].ports[0]",
        ),
        (
            "port out of range",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - ports:\n    - 80\n    - 70000\n"),
            Error,
            9,
            "spec.rules[0].ports[1]",
        ),
        (
            "port zero",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - from: [{{namespace: shop}}]\n    ports: [0]\n"),
            Error,
            8,
            "spec.rules[0].ports[0]",
        ),
        (
            "unknown field",
            format!("{POLICY}spec:\n  action: Deny\n  rules: [{{}}]\n  colour: red\n"),
            Error,
            7,
            "spec.colour",
        ),
        (
            "bad CIDR",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - from:\n    - ipBlocks: [10.0.0.0/33]\n"),
            Error,
            8,
            "spec.rules[0].from[0].ipBlocks[0]",
        ),
        (
            "bad principal glob",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - from:\n    - principals: [cluster.local/ns/shop]\n"),
            Error,
            8,
            "spec.rules[0].from[0].principals[0]",
        ),
        (
            "missing namespace",
            "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata:\n  name: p\nspec: {action: Deny, rules: [{}]}\n"
                .into(),
            Error,
            3,
            "metadata.namespace",
        ),
        (
            "duplicate resource name",
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata:\n  namespace: shop\n  name: web\n\
             spec: {serviceAccount: web, node: node-1, addresses: [10.9.0.2]}\n"
                .into(),
            Error,
            5,
            "metadata.name",
        ),
        (
            "duplicate address",
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: shop}\n\
             spec:\n  serviceAccount: api\n  node: node-1\n  addresses:\n  - 10.9.0.1\n"
                .into(),
            Error,
            8,
            "spec.addresses[0]",
        ),
        ("empty rule list", format!("{POLICY}spec:\n  action: Allow\n  rules: []\n"), Error, 6, "spec.rules"),
        (
            "empty peer",
            format!("{POLICY}spec:\n  action: Allow\n  rules:\n  - ports: [80]\n    from:\n    - {{}}\n"),
            Error,
            9,
            "spec.rules[0].from[0]",
        ),
        (
            "namespace that does not exist (yet)",
            format!("{POLICY}spec:\n  action: Allow\n  rules:\n  - from:\n    - namespace: ghost\n"),
            Warning,
            8,
            "spec.rules[0].from[0].namespace",
        ),
        (
            "selector that selects nothing",
            format!("{POLICY}spec:\n  action: Deny\n  selector:\n    matchLabels: {{app: nope}}\n  rules: [{{}}]\n"),
            Warning,
            6,
            "spec.selector",
        ),
        (
            "rule that can never match",
            format!("{POLICY}spec:\n  action: Deny\n  rules:\n  - ports: [80]\n    notPorts: [80]\n"),
            Warning,
            7,
            "spec.rules[0].ports",
        ),
        (
            "UDP port the kernel does not enforce",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: shop}\nspec:\n  \
             podSelector: {}\n  ingress:\n  - ports:\n    - port: 53\n      protocol: UDP\n"
                .into(),
            Warning,
            9,
            "spec.ingress[0].ports[0].protocol",
        ),
    ];
    assert!(table.len() >= 12);
    let dir = Scratch::new("table");
    let mut failures = Vec::new();
    for (i, (case, doc, sev, line, field)) in table.iter().enumerate() {
        let file = dir.write(&format!("case{i}.yaml"), &format!("{BASE}{doc}"));
        let (ok, _, stderr) = validate(&file);
        let line = CASE + line - 1;
        let prefix = match sev {
            Sev::Error => format!("{}:{line}: ", file.display()),
            Sev::Warning => format!("{}:{line}: warning: ", file.display()),
        };
        let found = stderr.lines().any(|l| l.starts_with(&prefix) && l.contains(&format!(" {field}: ")));
        // Errors fail the command; warnings never do.
        if !found || ok != (*sev == Sev::Warning) {
            failures.push(format!("{case}: expected {sev:?} at line {line} field {field} (exit ok = {ok}):\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_batch_with_several_problems_is_reported_whole_in_file_and_line_order() {
    let dir = Scratch::new("batch");
    // Two files; problems in several documents, several in one document, and one across files.
    let a = dir.write(
        "a.yaml",
        &format!(
            "{BASE}{POLICY}spec:\n  action: Deny\n  colour: red\n  rules:\n  - ports: [0, 99999]\n    from:\n    - namespace: ghost\n"
        ),
    );
    let b = dir.write(
        "b.yaml",
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: shop}\n\
         spec: {serviceAccount: api, node: node-1, addresses: [10.9.0.1]}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n",
    );
    let (ok, _, stderr) = validate(&dir.0);
    assert!(!ok, "{stderr}");
    let (a, b) = (a.display(), b.display());
    let expected = [
        format!("{a}:15: SegmentationPolicy shop/p: spec.colour: unknown field"),
        format!("{a}:17: SegmentationPolicy shop/p: spec.rules[0].ports[1]: invalid value: integer `99999`"),
        format!(
            "{b}:4: Workload shop/api: spec.addresses[0]: 10.9.0.1 is already the address of Workload shop/web ({a}:8)"
        ),
        format!("{b}:7: Gadget g: kind: unknown kind \"Gadget\""),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    let mut at = 0;
    for e in &expected {
        let Some(i) = lines[at..].iter().position(|l| l.starts_with(e.as_str())) else {
            panic!("missing or out of order: {e}\nin:\n{stderr}")
        };
        at += i + 1;
    }
    assert!(stderr.contains("invalid: 4 errors"), "{stderr}");
}

/// A cluster whose ztunnels read the policy file themselves (no CA, hence no control plane,
/// which would refuse the batch before any ztunnel sees it).
fn file_mode_cluster() -> Cluster {
    require_root();
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 1, 1);
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    palisade_sandbox::sweep_stale_test_clusters().expect("sweep stale test clusters");
    Cluster::up(spec).unwrap_or_else(|e| panic!("sandbox up: {e:#}"))
}

#[test]
fn a_rejected_policy_is_visible_in_config_dump_and_counted() {
    let mut cluster = file_mode_cluster();
    let node = cluster.info.nodes[0].name.clone();
    let rejected = |c: &Cluster| metric(c, &node, "palisade_policy_reloads_total{result=\"rejected\"}");
    let before = rejected(&cluster);
    let generation = cluster.policy_generation(&node).unwrap();

    let bad = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: bad, namespace: default}\n\
               spec:\n  action: Deny\n  rules:\n  - ports: [70000]\n";
    let err = cluster.set_policy(bad).expect_err("ztunnel must refuse a port out of range");
    assert_eq!(cluster.policy_generation(&node).unwrap(), generation, "the old policy stays in force: {err:#}");

    // The file ztunnel reads, and the line of the bad port in it.
    let text = cluster.policy_yaml(bad);
    let line = 1 + text.lines().position(|l| l.contains("ports: [70000]")).expect("bad line");
    let where_ = format!("{}:{line}: ", cluster.info.policy_file.display());
    let dump: Value = serde_json::from_str(&cluster.admin_get(&node, "/config_dump").unwrap()).unwrap();
    let last = &dump["last_rejected_policy"];
    let problems: Vec<&str> = last["problems"].as_array().expect("problems").iter().filter_map(Value::as_str).collect();
    assert!(
        problems.iter().any(|p| p.starts_with(&where_) && p.contains("spec.rules[0].ports[0]") && p.contains("70000")),
        "config_dump does not name {where_} and the field: {last}"
    );
    assert_eq!(last["generation_in_force"], generation, "{last}");
    assert!(last["at_unix_secs"].as_u64().is_some_and(|t| t > 0), "{last}");
    assert!(rejected(&cluster) > before, "the rejection is not counted");
}
