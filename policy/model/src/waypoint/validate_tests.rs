//! Validation of the waypoint's kinds: each bad input is reported at its file, line and field
//! (the line marked `# <-` in the case), with nothing else wrong in the batch.
use std::path::Path;

use crate::load::{Batch, parse_into};
use crate::validate::{Finding, Severity, check_batch};

/// A namespace served by waypoint `shop/waypoint`, with one Service `web` (port 80).
const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/use-waypoint: waypoint
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: palisade-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: waypoint-0, namespace: shop}
spec:
  serviceAccount: waypoint
  node: n1
  addresses: [10.0.1.2]
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop}
spec:
  serviceAccount: web
  node: n1
  addresses: [10.0.2.1]
  labels: {app: web}
  ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
";

fn check(text: &str) -> Vec<Finding> {
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("w.yaml"), text);
    check_batch(&b)
}

const ROUTE_HEAD: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: web
";

const AUTHZ_HEAD: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
";

const TRAFFIC_HEAD: &str = "apiVersion: palisade.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: t, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
";

/// (case, severity, field, part of the message)
fn cases() -> Vec<(String, Severity, &'static str, &'static str)> {
    use Severity::{Error, Warning};
    let route = |rest: &str| format!("{ROUTE_HEAD}{rest}");
    let authz = |rest: &str| format!("{AUTHZ_HEAD}{rest}");
    let traffic = |rest: &str| format!("{TRAFFIC_HEAD}{rest}");
    let backend = "    backendRefs:\n    - name: web\n      port: 80\n";
    vec![
        (
            route(&format!(
                "  rules:\n  - matches:\n    - path:\n        type: RegularExpression\n        value: \"/items/[0-9\"  # <-\n{backend}"
            )),
            Error,
            "spec.rules[0].matches[0].path.value",
            "is not a regular expression: unclosed character class",
        ),
        (
            route("  rules:\n  - matches:\n    - headers:\n      - type: RegularExpression\n        name: x-user\n        value: \"(a\"  # <-\n"),
            Error,
            "spec.rules[0].matches[0].headers[0].value",
            "is not a regular expression",
        ),
        (
            route("  rules:\n  - matches:\n    - path:\n        type: Exact\n        value: items  # <-\n"),
            Error,
            "spec.rules[0].matches[0].path.value",
            "does not start with `/`",
        ),
        (
            route("  rules:\n  - backendRefs:\n    - name: web\n      port: 80\n      weight: 2000000  # <-\n"),
            Error,
            "spec.rules[0].backendRefs[0].weight",
            "largest weight",
        ),
        (
            route(&format!("  rules:\n  - timeouts:\n      request: 10 seconds  # <-\n{backend}")),
            Error,
            "spec.rules[0].timeouts.request",
            "is not a duration",
        ),
        (
            route(&format!(
                "  rules:\n  - timeouts:\n      request: 1s\n      backendRequest: 2s  # <-\n{backend}"
            )),
            Error,
            "spec.rules[0].timeouts.backendRequest",
            "longer than timeouts.request",
        ),
        (
            route(
                "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: a.example}\n    - type: URLRewrite  # <-\n      urlRewrite: {hostname: b.example}\n",
            ),
            Error,
            "spec.rules[0].filters[1]",
            "URLRewrite and RequestRedirect conflict",
        ),
        (
            route("  rules:\n  - filters:\n    - type: RequestHeaderModifier  # <-\n      responseHeaderModifier: {remove: [x-a]}\n"),
            Error,
            "spec.rules[0].filters[0]",
            "takes `requestHeaderModifier`",
        ),
        (
            route(
                "  rules:\n  - matches:\n    - path: {type: Exact, value: /a}\n    filters:\n    - type: URLRewrite\n      urlRewrite:\n        path:  # <-\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /b\n",
            ),
            Error,
            "spec.rules[0].filters[0].urlRewrite.path",
            "every match of the rule to be a PathPrefix",
        ),
        (
            route(&format!("    port: 81  # <-\n  rules:\n  - matches: []\n{backend}")),
            Error,
            "spec.parentRefs[0].port",
            "81 is not a port of Service shop/web",
        ),
        (
            route("  rules:\n  - backendRefs:\n    - name: web\n      port: 8080  # <-\n"),
            Error,
            "spec.rules[0].backendRefs[0].port",
            "8080 is not a port of Service shop/web",
        ),
        (
            route("  rules:\n  - backendRefs:\n    - name: web  # <-\n"),
            Error,
            "spec.rules[0].backendRefs[0]",
            "`port` is required",
        ),
        (
            route(&format!("  - name: gone  # <-\n    kind: Service\n    group: \"\"\n  rules:\n{}", backend.replacen("    b", "  - b", 1))),
            Warning,
            "spec.parentRefs[1].name",
            "no Service shop/gone",
        ),
        (
            route(&format!("  rules:\n  - retry:\n      codes: [200]  # <-\n{backend}")),
            Error,
            "spec.rules[0].retry.codes[0]",
            "not an error status",
        ),
        (
            route(&format!("  rules:\n  - sessionPersistence: {{}}  # <-\n{backend}")),
            Error,
            "spec.rules[0].sessionPersistence",
            "unknown field",
        ),
        (
            route("  rules:\n  - matches:\n    - method: FETCH  # <-\n"),
            Error,
            "spec.rules[0].matches[0].method",
            "unknown variant",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs:\n  - name: waypoint  # <-\n"
                .to_string(),
            Error,
            "spec.parentRefs[0]",
            "attaches to a Service",
        ),
        (
            format!("{ROUTE_HEAD}  hostnames: [web.example]  # <-\n  rules:\n{}", backend.replacen("    b", "  - b", 1)),
            Warning,
            "spec.hostnames",
            "not used",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\n\
             spec:\n  targetRef: {kind: Service, name: db}  # <-\n"
                .to_string(),
            Error,
            "spec.targetRef",
            "no virtual address",
        ),
        (authz("  selector:  # <-\n    matchLabels: {app: web}\n"), Error, "spec.selector", "targetRefs"),
        (authz("  action: DENY\n  rules: [{}]\n").replace("spec:\n", "spec:  # <-\n"), Error, "spec", "`targetRefs` is required"),
        (
            authz("  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: other  # <-\n"),
            Error,
            "spec.targetRefs[0].name",
            "no Gateway shop/other",
        ),
        (
            authz("  targetRefs: [{kind: Service, group: \"\", name: web}]\n  action: CUSTOM  # <-\n"),
            Error,
            "spec.action",
            "CUSTOM",
        ),
        (
            authz(
                "  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules:\n  - when:\n    - key: request.auth.claims[iss]  # <-\n      values: [x]\n",
            ),
            Error,
            "spec.rules[0].when[0].key",
            "is not supported",
        ),
        (
            authz(
                "  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules:\n  - to:\n    - operation:\n        ports:\n        - http  # <-\n",
            ),
            Error,
            "spec.rules[0].to[0].operation.ports[0]",
            "is not a port",
        ),
        (
            authz(
                "  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules:\n  - from:\n    - source:\n        principals:\n        - cluster.local/ns/*/sa/web  # <-\n",
            ),
            Error,
            "spec.rules[0].from[0].source.principals[0]",
            "`prefix*` or `*suffix`",
        ),
        (
            authz(
                "  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [x]  # <-\n",
            ),
            Error,
            "spec.rules[0].from[0].source.requestPrincipals",
            "unknown field",
        ),
        (
            traffic("  loadBalancer:  # <-\n    roundRobin: {}\n    leastRequest: {}\n"),
            Error,
            "spec.loadBalancer",
            "exactly one of",
        ),
        (
            traffic("  loadBalancer:\n    ringHash:  # <-\n      header: x-user\n      sourceIP: true\n"),
            Error,
            "spec.loadBalancer.ringHash",
            "exactly one key",
        ),
        (
            traffic("  outlierDetection:\n    interval: 5 s  # <-\n"),
            Error,
            "spec.outlierDetection.interval",
            "is not a duration",
        ),
        (
            traffic("  outlierDetection:\n    maxEjectionPercent: 150  # <-\n"),
            Error,
            "spec.outlierDetection.maxEjectionPercent",
            "more than 100",
        ),
        (
            traffic("  connectionPool:\n    maxConnections: 0  # <-\n"),
            Error,
            "spec.connectionPool.maxConnections",
            "omit it for no limit",
        ),
        (
            format!("{}---\n{}", traffic(""), traffic("").replace("name: t,", "name: t2,").replace("targetRef: {kind: Service, name: web}", "targetRef: {kind: Service, name: web}  # <-")),
            Error,
            "spec.targetRef.name",
            "already has TrafficPolicy t",
        ),
        (
            "apiVersion: palisade.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\nspec:\n  targetRef: {kind: Deployment, name: web}  # <-\n"
                .to_string(),
            Error,
            "spec.targetRef",
            "targets a Service",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\nspec:\n  gatewayClassName: istio  # <-\n"
                .to_string(),
            Warning,
            "spec.gatewayClassName",
            "is ignored",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: shop\n  labels:  # <-\n    istio.io/use-waypoint: nope\nspec:\n  clusterIP: 10.96.0.11\n  selector: {app: web}\n  ports: [{port: 80}]\n"
                .to_string(),
            Warning,
            "metadata.labels",
            "names shop/nope",
        ),
    ]
}

#[test]
fn every_bad_input_is_reported_at_its_file_line_and_field() {
    let base_lines = BASE.lines().count() + 1; // the `---` before the case
    let baseline = check(BASE);
    assert!(baseline.is_empty(), "the base is clean: {baseline:#?}");
    for (case, severity, field, message) in cases() {
        let text = format!("{BASE}---\n{case}");
        let marked = case.lines().position(|l| l.contains("# <-")).expect("a case marks its line") + 1;
        let line = base_lines + marked;
        let findings = check(&text);
        assert!(findings.iter().all(|f| !f.message.contains('\n')), "one line each: {findings:#?}");
        let hit = findings
            .iter()
            .any(|f| f.severity == severity && f.field == field && f.line == line && f.message.contains(message));
        let shown: Vec<String> = findings.iter().map(|f| format!("{} [{}]", f, f.field)).collect();
        assert!(hit, "expected {severity} at w.yaml:{line} {field}: …{message}…\ncase:\n{case}\nfound: {shown:#?}");
        let others: Vec<&String> =
            shown.iter().zip(&findings).filter(|(_, f)| f.is_error() && f.field != field).map(|(s, _)| s).collect();
        assert!(others.is_empty(), "only the expected error:\ncase:\n{case}\nothers: {others:#?}");
    }
}

/// The rule: an L7 resource on a Service that no waypoint serves is an error that
/// names the label to add, whether the namespace has no waypoint or the Service opts out.
#[test]
fn l7_resources_on_a_service_without_waypoint_are_errors() {
    let plain = BASE.replace("  labels:\n    istio.io/use-waypoint: waypoint\n", "");
    let l7 = format!(
        "{ROUTE_HEAD}  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n---\n{AUTHZ_HEAD}  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n---\n{TRAFFIC_HEAD}"
    );
    let text = format!("{plain}---\n{l7}");
    let errors: Vec<Finding> = check(&text).into_iter().filter(Finding::is_error).collect();
    let fields: Vec<(&str, &str)> =
        errors.iter().map(|f| (f.resource.split(' ').next().unwrap(), f.field.as_str())).collect();
    assert_eq!(
        fields,
        [
            ("HTTPRoute", "spec.parentRefs[0]"),
            ("AuthorizationPolicy", "spec.targetRefs[0]"),
            ("TrafficPolicy", "spec.targetRef")
        ],
        "{errors:#?}"
    );
    for e in &errors {
        assert!(e.message.contains("not served by a waypoint") && e.message.contains("istio.io/use-waypoint"), "{e}");
    }

    // The Service opts out of its namespace's waypoint: the same errors, saying so.
    let opted = BASE.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: none}}",
    );
    let errors: Vec<Finding> = check(&format!("{opted}---\n{l7}")).into_iter().filter(Finding::is_error).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors.iter().all(|e| e.message.contains("opts out")), "{errors:#?}");

    // With the waypoint, the same resources are fine.
    let served: Vec<Finding> = check(&format!("{BASE}---\n{l7}")).into_iter().filter(Finding::is_error).collect();
    assert!(served.is_empty(), "{served:#?}");
}

/// The Service's label wins over its Namespace's, and may name a waypoint of another namespace.
#[test]
fn the_service_label_wins_over_the_namespace_label() {
    let text = format!(
        "{BASE}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: shared, namespace: mesh}}\n\
         spec: {{gatewayClassName: palisade-waypoint}}\n"
    )
    .replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: mesh}}",
    );
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("w.yaml"), &text);
    let att = super::attach::attachments(&b.resources);
    assert_eq!(att.waypoint_of("shop", "web"), Ok("mesh/shared"));
    // Another Service of the namespace (not defined yet) follows the namespace's label.
    assert_eq!(att.waypoint_of("shop", "other"), Ok("shop/waypoint"));
    assert!(att.waypoint_of("mesh", "x").is_err());
}

#[test]
fn durations_are_read_as_gateway_api_writes_them() {
    use std::time::Duration;
    let d = super::parse_duration;
    assert_eq!(d("10s"), Some(Duration::from_secs(10)));
    assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(d("1m"), Some(Duration::from_secs(60)));
    assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(d("0s"), Some(Duration::ZERO));
    for bad in ["", "10", "1.5s", "10 s", "s", "-1s", "123456s", "1h1h1h1h1h", "1d"] {
        assert_eq!(d(bad), None, "{bad:?}");
    }
}
