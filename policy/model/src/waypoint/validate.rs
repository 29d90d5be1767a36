//! Checks of the waypoint's resources, each at its field's line: shapes serde cannot express
//! (one filter setting per `type`, one load balancer), regular expressions that must compile
//! (with the `regex` crate, the engine the waypoint runs), durations, weights, ports, and
//! references. References to a Service that does not exist (yet) are warnings, as elsewhere;
//! an L7 resource on a Service that no waypoint serves is an error: it would be accepted and
//! never enforced.
use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::ServiceSpec;

use super::attach::{Attachments, attachments};
use super::config::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, WAYPOINT_FOR_LABEL, WAYPOINT_GATEWAY_CLASS, WaypointFor};
use super::gateway::{
    BackendRef, FilterType, GATEWAY_GROUP, HttpPathModifier, HttpRouteRule, HttpRouteSpec, HttpValueMatch,
    PathMatchType, PathModifierType, ValueMatchType,
};
use super::istio::{AuthorizationPolicySpec, condition_key, port_number};
use super::traffic::TrafficPolicySpec;
use super::{DURATION_FORM, parse_duration};
use crate::compile::services::{ClusterIp, cluster_ip};
use crate::load::{Located, Sources};
use crate::resource::Resource;
use crate::validate::{Finding, is_dns_label};

/// Gateway API's largest backend weight.
const MAX_WEIGHT: u32 = 1_000_000;

/// Every finding about the waypoint's resources (and the use-waypoint labels) of `resources`.
pub fn check(resources: &[Located], sources: &Sources) -> Vec<Finding> {
    let att = attachments(resources);
    let services: HashMap<String, &ServiceSpec> = resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::Service { metadata, spec, .. } => {
                Some((format!("{}/{}", metadata.namespace.as_deref().unwrap_or_default(), metadata.name), &**spec))
            }
            _ => None,
        })
        .collect();
    let mut out = Out { sources, att: &att, services: &services, list: Vec::new(), at: None };
    let mut traffic_targets: HashMap<String, &Located> = HashMap::new();
    // Only read when a waypoint serves workloads.
    let workload_ports = match att.waypoints.values().any(|w| w.waypoint_for.is_some_and(WaypointFor::workloads)) {
        true => super::workload::service_ports(resources),
        false => HashMap::new(),
    };
    for r in resources {
        out.at = Some(r);
        let meta = r.resource.metadata();
        let ns = meta.namespace.as_deref().unwrap_or_default();
        match &r.resource {
            Resource::Service { .. } | Resource::Namespace { .. } => {
                let own = if matches!(r.resource, Resource::Namespace { .. }) { &meta.name } else { ns };
                if let Some(key) = att.dangling(&meta.labels, own) {
                    out.warning(
                        "metadata.labels",
                        format!(
                            "{USE_WAYPOINT_LABEL} names {key}, which is not a Gateway of class {WAYPOINT_GATEWAY_CLASS} (yet): no waypoint serves this {}",
                            r.resource.kind()
                        ),
                    );
                }
                if matches!(r.resource, Resource::Service { .. })
                    && let Some((key, serves)) = att.service_label_without_effect(meta)
                {
                    out.warning(
                        "metadata.labels",
                        format!("{USE_WAYPOINT_LABEL} names {key}, which is `{serves}`: it has no effect for Service traffic"),
                    );
                }
            }
            Resource::Workload { spec, .. } => {
                for (error, field, message) in super::workload::check(&att, meta, spec, &workload_ports) {
                    out.push(error, field, message);
                }
            }
            Resource::HttpRoute { spec, .. } => out.http_route(ns, spec),
            Resource::Gateway { spec, .. } => {
                if let Some(value) = meta.labels.get(WAYPOINT_FOR_LABEL)
                    && WaypointFor::parse(Some(value)).is_none()
                {
                    out.error(
                        "metadata.labels",
                        format!("{WAYPOINT_FOR_LABEL}: {value:?} is not one of service, workload, all, none"),
                    );
                }
                if spec.gateway_class_name != WAYPOINT_GATEWAY_CLASS {
                    out.warning(
                        "spec.gatewayClassName",
                        format!(
                            "{:?} is not {WAYPOINT_GATEWAY_CLASS}: Palisade serves only waypoints, this Gateway is ignored",
                            spec.gateway_class_name
                        ),
                    );
                } else if att.waypoints.get(&format!("{ns}/{}", meta.name)).is_some_and(|w| w.workloads.is_empty()) {
                    out.warning(
                        "metadata.name",
                        format!(
                            "no Workload of namespace {ns} is labelled {GATEWAY_NAME_LABEL}: {}: the waypoint has nowhere to run",
                            meta.name
                        ),
                    );
                }
            }
            Resource::AuthorizationPolicy { spec, .. } => out.authorization(ns, spec),
            Resource::TrafficPolicy { spec, .. } => {
                out.traffic(ns, spec);
                let key = format!("{ns}/{}", spec.target_ref.name);
                if let Some(first) = traffic_targets.insert(key.clone(), r) {
                    let first_at = sources.locate(&first.origin, "spec.targetRef.name");
                    out.error(
                        "spec.targetRef.name",
                        format!(
                            "Service {key} already has TrafficPolicy {} ({first_at}): one per Service",
                            first.resource.metadata().name
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    out.list
}

struct Out<'a> {
    sources: &'a Sources,
    att: &'a Attachments<'a>,
    services: &'a HashMap<String, &'a ServiceSpec>,
    list: Vec<Finding>,
    /// The resource being checked.
    at: Option<&'a Located>,
}

impl Out<'_> {
    fn push(&mut self, error: bool, field: &str, message: String) {
        let r = self.at.expect("a resource is being checked");
        let meta = r.resource.metadata();
        let ns = meta.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
        let label = format!("{} {ns}{}", r.resource.kind(), meta.name);
        let origin = self.sources.locate(&r.origin, field);
        self.list.push(match error {
            true => Finding::error(&origin, &label, field, message),
            false => Finding::warning(&origin, &label, field, message),
        });
    }

    fn error(&mut self, field: &str, message: String) {
        self.push(true, field, message)
    }

    fn warning(&mut self, field: &str, message: String) {
        self.push(false, field, message)
    }

    /// A reference to Service `ns/name` (at `field`), optionally to one of its ports; with
    /// `l7`, what refers to it must be enforced by a waypoint serving it.
    fn service(&mut self, field: &str, ns: &str, name: &str, port: Option<(&str, u16)>, l7: bool) {
        let key = format!("{ns}/{name}");
        match self.services.get(&key) {
            None => self.warning(&format!("{field}.name"), format!("no Service {key} (yet)")),
            Some(spec) => {
                if let Some((port_field, port)) = port {
                    let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
                    if !ports.contains(&i32::from(port)) {
                        let list: Vec<String> = ports.iter().map(i32::to_string).collect();
                        self.error(
                            &format!("{field}.{port_field}"),
                            format!("{port} is not a port of Service {key} (its ports: {})", list.join(", ")),
                        );
                    }
                }
            }
        }
        if !l7 {
            return;
        }
        if let Err(why) = self.att.waypoint_of(ns, name) {
            self.error(
                field,
                format!("Service {key} is not served by a waypoint, so this would not be enforced: {why}"),
            );
        } else if let Some(spec) = self.services.get(&key)
            && !matches!(cluster_ip(spec), ClusterIp::Vip(_))
        {
            // A waypoint serves a Service's VIP; without one nothing reaches it.
            self.error(
                field,
                format!("Service {key} has no virtual address (clusterIP), so this would not be enforced"),
            );
        }
    }

    fn duration(&mut self, field: &str, value: &Option<String>) {
        if let Some(v) = value
            && parse_duration(v).is_none()
        {
            self.error(field, format!("{v:?} {DURATION_FORM}"));
        }
    }

    fn regex(&mut self, field: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            // The parser's message draws a caret under the pattern over several lines; a
            // finding is one line, so keep its last line (what is wrong).
            let text = e.to_string();
            let why = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
            let why = why.trim().trim_start_matches("error: ");
            self.error(field, format!("{pattern:?} is not a regular expression: {why}"));
        }
    }

    fn http_route(&mut self, ns: &str, spec: &HttpRouteSpec) {
        if spec.parent_refs.is_empty() {
            self.error("spec.parentRefs", "required: the Service this route applies to (`kind: Service`)".into());
        }
        for (i, p) in spec.parent_refs.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            if p.kind() != "Service" || !matches!(p.group(), "" | "core") {
                self.error(
                    &field,
                    format!(
                        "a route attaches to a Service here (`group: \"\"`, `kind: Service`), not to {}/{}: the waypoint serves Services",
                        p.group(),
                        p.kind()
                    ),
                );
                continue;
            }
            let parent_ns = p.namespace.as_deref().unwrap_or(ns);
            if parent_ns != ns {
                self.error(
                    &format!("{field}.namespace"),
                    "a route in another namespace than its Service (a consumer route) is not supported".into(),
                );
                continue;
            }
            self.service(&field, parent_ns, &p.name, p.port.map(|port| ("port", port)), true);
            if let (Some(section), Some(spec)) = (&p.section_name, self.services.get(&format!("{ns}/{}", p.name)))
                && !spec.ports.iter().flatten().any(|sp| sp.name.as_deref() == Some(section.as_str()))
            {
                self.error(
                    &format!("{field}.sectionName"),
                    format!("Service {} has no port named {section:?}", p.name),
                );
            }
        }
        if !spec.hostnames.is_empty() {
            self.warning(
                "spec.hostnames",
                "not used: a route on a Service applies to the Service's own addresses and names".into(),
            );
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            self.rule(ns, &format!("spec.rules[{i}]"), rule);
        }
    }

    fn rule(&mut self, ns: &str, field: &str, rule: &HttpRouteRule) {
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("{field}.matches[{m}]");
            if let Some(path) = &mat.path {
                let pf = format!("{at}.path.value");
                match path.kind {
                    PathMatchType::RegularExpression => self.regex(&pf, &path.value),
                    _ if !path.value.starts_with('/') => {
                        self.error(&pf, format!("{:?} does not start with `/`", path.value))
                    }
                    _ => {}
                }
            }
            self.value_matches(&format!("{at}.headers"), &mat.headers, true);
            self.value_matches(&format!("{at}.queryParams"), &mat.query_params, false);
        }
        let mut seen: HashMap<FilterType, usize> = HashMap::new();
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = format!("{field}.filters[{f}]");
            let present = filter.present();
            if present != [filter.kind.field()] {
                self.error(
                    &at,
                    format!(
                        "type {:?} takes `{}` and no other settings (found: {present:?})",
                        filter.kind,
                        filter.kind.field()
                    ),
                );
            }
            if filter.kind != FilterType::RequestMirror
                && let Some(first) = seen.insert(filter.kind, f)
            {
                self.error(
                    &format!("{at}.type"),
                    format!("{:?} is already filters[{first}]: at most one per rule", filter.kind),
                );
            }
            for (name, m) in [
                ("requestHeaderModifier", &filter.request_header_modifier),
                ("responseHeaderModifier", &filter.response_header_modifier),
            ] {
                let Some(m) = m else { continue };
                let mut names = HashSet::new();
                let listed = m.set.iter().map(|h| ("set", &h.name)).chain(m.add.iter().map(|h| ("add", &h.name)));
                for (k, (list, header)) in listed.chain(m.remove.iter().map(|h| ("remove", h))).enumerate() {
                    let hf = format!("{at}.{name}.{list}");
                    if !is_token(header) {
                        self.error(&hf, format!("{header:?} is not a header name"));
                    } else if !names.insert(header.to_ascii_lowercase()) {
                        self.error(&hf, format!("header {header:?} is modified twice (entry {k})"));
                    }
                }
            }
            if let Some(r) = &filter.request_redirect {
                if let Some(s) = &r.scheme
                    && s != "http"
                    && s != "https"
                {
                    self.error(&format!("{at}.requestRedirect.scheme"), format!("{s:?} is neither http nor https"));
                }
                if let Some(c) = r.status_code
                    && c != 301
                    && c != 302
                {
                    self.error(&format!("{at}.requestRedirect.statusCode"), format!("{c} is neither 301 nor 302"));
                }
                self.path_modifier(&format!("{at}.requestRedirect.path"), &r.path, rule);
            }
            if let Some(r) = &filter.url_rewrite {
                self.path_modifier(&format!("{at}.urlRewrite.path"), &r.path, rule);
            }
            if let Some(m) = &filter.request_mirror {
                self.backend(ns, &format!("{at}.requestMirror.backendRef"), &m.backend_ref);
            }
        }
        let redirects = seen.contains_key(&FilterType::RequestRedirect);
        if let (true, Some(f)) = (redirects, seen.get(&FilterType::UrlRewrite)) {
            self.error(
                &format!("{field}.filters[{f}]"),
                "a rule that redirects does not forward: URLRewrite and RequestRedirect conflict".into(),
            );
        }
        let mut total = 0u64;
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            let at = format!("{field}.backendRefs[{b}]");
            self.backend(ns, &at, &backend.as_ref());
            let weight = backend.weight.unwrap_or(1);
            if weight > MAX_WEIGHT {
                self.error(&format!("{at}.weight"), format!("{weight} is more than the largest weight, {MAX_WEIGHT}"));
            }
            total += u64::from(weight);
        }
        if !rule.backend_refs.is_empty() && total == 0 {
            self.warning(&format!("{field}.backendRefs"), "every weight is 0: matching requests get 500".into());
        }
        if rule.backend_refs.is_empty() && !redirects {
            self.warning(field, "no backendRefs and no redirect: matching requests get 500".into());
        }
        if let Some(t) = &rule.timeouts {
            self.duration(&format!("{field}.timeouts.request"), &t.request);
            self.duration(&format!("{field}.timeouts.backendRequest"), &t.backend_request);
            let (request, backend) =
                (t.request.as_deref().and_then(parse_duration), t.backend_request.as_deref().and_then(parse_duration));
            if let (Some(r), Some(b)) = (request, backend)
                && !r.is_zero()
                && b > r
            {
                self.error(
                    &format!("{field}.timeouts.backendRequest"),
                    "longer than timeouts.request, which bounds every attempt".into(),
                );
            }
        }
        if let Some(retry) = &rule.retry {
            for (c, code) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    self.error(
                        &format!("{field}.retry.codes[{c}]"),
                        format!("{code} is not an error status (400 to 599)"),
                    );
                }
            }
            self.duration(&format!("{field}.retry.backoff"), &retry.backoff);
        }
    }

    fn value_matches(&mut self, field: &str, matches: &[HttpValueMatch], header: bool) {
        let mut names = HashSet::new();
        for (h, m) in matches.iter().enumerate() {
            let at = format!("{field}[{h}]");
            let valid = match header {
                true => is_token(&m.name),
                false => !m.name.is_empty(),
            };
            if !valid {
                self.error(&format!("{at}.name"), format!("{:?} is not a valid name", m.name));
            } else if !names.insert(if header { m.name.to_ascii_lowercase() } else { m.name.clone() }) {
                self.error(&format!("{at}.name"), format!("{:?} is matched twice in one match", m.name));
            }
            if m.kind == ValueMatchType::RegularExpression {
                self.regex(&format!("{at}.value"), &m.value);
            }
        }
    }

    fn path_modifier(&mut self, field: &str, path: &Option<HttpPathModifier>, rule: &HttpRouteRule) {
        let Some(p) = path else { return };
        match p.kind {
            PathModifierType::ReplaceFullPath => match (&p.replace_full_path, &p.replace_prefix_match) {
                (Some(v), None) if v.starts_with('/') => {}
                (Some(v), None) => {
                    self.error(&format!("{field}.replaceFullPath"), format!("{v:?} does not start with `/`"))
                }
                _ => self.error(field, "type ReplaceFullPath takes `replaceFullPath` (only)".into()),
            },
            PathModifierType::ReplacePrefixMatch => {
                match (&p.replace_prefix_match, &p.replace_full_path) {
                    (Some(v), None) if v.starts_with('/') => {}
                    (Some(v), None) => {
                        self.error(&format!("{field}.replacePrefixMatch"), format!("{v:?} does not start with `/`"))
                    }
                    _ => self.error(field, "type ReplacePrefixMatch takes `replacePrefixMatch` (only)".into()),
                }
                let prefix_only =
                    rule.matches.iter().all(|m| m.path.as_ref().is_none_or(|p| p.kind == PathMatchType::PathPrefix));
                if !prefix_only {
                    self.error(field, "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into());
                }
            }
        }
    }

    fn backend(&mut self, ns: &str, field: &str, b: &BackendRef) {
        if !b.is_service() {
            let kind = b.kind.as_deref().unwrap_or("Service");
            self.error(field, format!("a backend is a Service (`kind: Service`), not {kind:?}"));
            return;
        }
        if b.namespace.as_deref().is_some_and(|n| n != ns) {
            self.error(
                &format!("{field}.namespace"),
                "a backend in another namespace is not supported (Gateway API would need a ReferenceGrant)".into(),
            );
            return;
        }
        match b.port {
            None => self.error(field, "`port` is required for a Service backend".into()),
            Some(port) => self.service(field, ns, &b.name, Some(("port", port)), false),
        }
    }

    fn authorization(&mut self, ns: &str, spec: &AuthorizationPolicySpec) {
        if spec.selector.is_some() {
            self.error(
                "spec.selector",
                "a selector makes an L4 policy (enforced by ztunnel in Istio): attach to a Service or waypoint with `targetRefs`, or write a SegmentationPolicy".into(),
            );
        }
        let targets = spec.targets();
        if targets.is_empty() && spec.selector.is_none() {
            self.error(
                "spec",
                "`targetRefs` is required: the Service or the waypoint Gateway that enforces this policy (for an L4 policy write a SegmentationPolicy)".into(),
            );
        }
        for (field, t) in targets {
            if t.namespace.as_deref().is_some_and(|n| n != ns) {
                self.error(&format!("{field}.namespace"), "must be the policy's own namespace".into());
                continue;
            }
            let group = t.group.as_deref().unwrap_or("");
            match (t.kind.as_str(), group) {
                ("Service", "" | "core") => self.service(&field, ns, &t.name, None, true),
                ("Gateway", GATEWAY_GROUP) => {
                    if !self.att.waypoints.contains_key(&format!("{ns}/{}", t.name)) {
                        self.error(
                            &format!("{field}.name"),
                            format!(
                                "no Gateway {ns}/{} of class {WAYPOINT_GATEWAY_CLASS}: this policy would not be enforced",
                                t.name
                            ),
                        );
                    }
                }
                (kind, group) => self.error(
                    &field,
                    format!("targets a Service (`kind: Service`) or a waypoint (`group: {GATEWAY_GROUP}`, `kind: Gateway`), not {group}/{kind}"),
                ),
            }
        }
        if spec.action == super::istio::IstioAction::Custom {
            self.error("spec.action", "CUSTOM (external authorization) is not supported".into());
        }
        for (r, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (f, from) in rule.from.iter().enumerate() {
                let Some(s) = &from.source else {
                    self.error(&format!("{at}.from[{f}]"), "`source` is required".into());
                    continue;
                };
                let sf = format!("{at}.from[{f}].source");
                for (list, values) in [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                ] {
                    self.patterns(&format!("{sf}.{list}"), values);
                }
            }
            for (t, to) in rule.to.iter().enumerate() {
                let Some(o) = &to.operation else {
                    self.error(&format!("{at}.to[{t}]"), "`operation` is required".into());
                    continue;
                };
                let of = format!("{at}.to[{t}].operation");
                for (list, values) in [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                ] {
                    self.patterns(&format!("{of}.{list}"), values);
                }
                for (list, values) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                    for (i, p) in values.iter().enumerate() {
                        if !p.starts_with('/') && !p.starts_with('*') {
                            self.error(&format!("{of}.{list}[{i}]"), format!("{p:?} does not start with `/` (or `*`)"));
                        }
                    }
                }
                for (list, ports) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                    for (i, p) in ports.iter().enumerate() {
                        if port_number(p).is_none() {
                            self.error(&format!("{of}.{list}[{i}]"), format!("{p:?} is not a port"));
                        }
                    }
                }
            }
            for (w, cond) in rule.when.iter().enumerate() {
                let cf = format!("{at}.when[{w}]");
                if condition_key(&cond.key).is_none() {
                    self.error(
                        &format!("{cf}.key"),
                        format!("{:?} is not supported (request.headers[<name>], source.ip, source.namespace, source.principal, destination.port)", cond.key),
                    );
                }
                if cond.values.is_empty() && cond.not_values.is_empty() {
                    self.error(&cf, "needs `values` or `notValues`".into());
                }
            }
        }
    }

    /// Istio's value patterns: exact, `*`, `prefix*` or `*suffix`.
    fn patterns(&mut self, field: &str, values: &[String]) {
        for (i, v) in values.iter().enumerate() {
            let inner = v.strip_prefix('*').unwrap_or(v);
            let inner = inner.strip_suffix('*').unwrap_or(inner);
            if v.is_empty() || inner.contains('*') || (v.len() > 1 && v.starts_with('*') && v.ends_with('*')) {
                self.error(&format!("{field}[{i}]"), format!("{v:?} is not a value, `*`, `prefix*` or `*suffix`"));
            }
        }
    }

    fn traffic(&mut self, ns: &str, spec: &TrafficPolicySpec) {
        let t = &spec.target_ref;
        if t.kind != "Service" || !matches!(t.group.as_deref(), None | Some("" | "core")) {
            self.error("spec.targetRef", format!("targets a Service (`kind: Service`), not {:?}", t.kind));
        } else {
            self.service("spec.targetRef", ns, &t.name, None, true);
        }
        if !is_dns_label(&t.name) {
            self.error("spec.targetRef.name", format!("{:?} is not a lowercase DNS name", t.name));
        }
        if let Some(lb) = &spec.load_balancer {
            let set = [lb.round_robin.is_some(), lb.least_request.is_some(), lb.ring_hash.is_some()];
            if set.iter().filter(|s| **s).count() != 1 {
                self.error("spec.loadBalancer", "exactly one of roundRobin, leastRequest, ringHash".into());
            }
            if let Some(rh) = &lb.ring_hash {
                let header = rh.header.as_deref().filter(|h| !h.is_empty());
                match (header, rh.source_ip) {
                    (Some(h), None | Some(false)) => {
                        if !is_token(h) {
                            self.error("spec.loadBalancer.ringHash.header", format!("{h:?} is not a header name"));
                        }
                    }
                    (None, Some(true)) => {}
                    _ => self.error(
                        "spec.loadBalancer.ringHash",
                        "exactly one key: `header: <name>` or `sourceIP: true`".into(),
                    ),
                }
            }
        }
        if let Some(pool) = &spec.connection_pool {
            for (name, v) in [
                ("maxConnections", pool.max_connections),
                ("maxPendingRequests", pool.max_pending_requests),
                ("maxRequestsPerConnection", pool.max_requests_per_connection),
                ("maxActiveRequests", pool.max_active_requests),
                ("maxActiveRetries", pool.max_active_retries),
            ] {
                if v == Some(0) && name != "maxActiveRetries" && name != "maxPendingRequests" {
                    self.error(
                        &format!("spec.connectionPool.{name}"),
                        "0 would refuse every request; omit it for no limit".into(),
                    );
                }
            }
        }
        if let Some(o) = &spec.outlier_detection {
            for (name, v) in
                [("consecutive5xx", o.consecutive_5xx), ("consecutiveGatewayErrors", o.consecutive_gateway_errors)]
            {
                if v == Some(0) {
                    self.error(&format!("spec.outlierDetection.{name}"), "0 would eject on no error; omit it".into());
                }
            }
            self.duration("spec.outlierDetection.interval", &o.interval);
            self.duration("spec.outlierDetection.baseEjectionTime", &o.base_ejection_time);
            if o.interval.as_deref().and_then(parse_duration).is_some_and(|d| d.is_zero()) {
                self.error("spec.outlierDetection.interval", "must be more than 0".into());
            }
            if let Some(p) = o.max_ejection_percent
                && p > 100
            {
                self.error("spec.outlierDetection.maxEjectionPercent", format!("{p} is more than 100"));
            }
        }
        if let Some(t) = &spec.timeouts {
            self.duration("spec.timeouts.connect", &t.connect);
            self.duration("spec.timeouts.idle", &t.idle);
        }
    }
}

/// An HTTP header name (RFC 9110 token).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
