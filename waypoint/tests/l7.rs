//! The engine's HTTP path end to end with real hyper clients and backends: route matching of
//! each kind, filters, weighted split, authorization, gRPC trailers, TCP pass-through.
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use palisade_model::waypoint::config::{
    AuthzAction, AuthzOperation, AuthzPolicy, AuthzRule, AuthzSource, Filter, HeaderModifier, PathMatch, PathRewrite,
    Redirect, Rewrite, RouteMatch, StringMatch, TrafficPolicy, ValueMatch,
};
use palisade_waypoint::Settings;
use palisade_waypoint::body::{ProxyBody, boxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn value(name: &str, v: StringMatch) -> ValueMatch {
    ValueMatch { name: name.into(), value: v }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_by_path_header_query_and_method_and_filters_apply() {
    bounded(60, async {
        let mut servers = HashMap::new();
        for name in ["exact", "regex", "header", "query", "method", "prefix", "default"] {
            servers.insert(name, serve_backend(name, echo(name)).await);
        }
        let b =
            |name: &str| backend(&format!("ns/{name}:80"), vec![servers[name].endpoint()], TrafficPolicy::default());
        let mut prefix = route("ns/r#prefix", vec![path(PathMatch::Prefix("/api".into()))], vec![(b("prefix"), 1)]);
        prefix.filters = vec![
            Filter::Rewrite(Rewrite {
                hostname: Some("rewritten.test".into()),
                path: Some(PathRewrite::Prefix("/v2".into())),
            }),
            Filter::RequestHeaders(HeaderModifier {
                add: vec![("x-added".into(), "yes".into())],
                ..Default::default()
            }),
            Filter::ResponseHeaders(HeaderModifier {
                set: vec![("x-resp".into(), "set".into())],
                ..Default::default()
            }),
        ];
        let mut redirect = route("ns/r#redirect", vec![path(PathMatch::Exact("/old".into()))], vec![]);
        redirect.filters = vec![Filter::Redirect(Redirect {
            path: Some(PathRewrite::Full("/new".into())),
            status: 301,
            ..Default::default()
        })];
        let routes = vec![
            redirect,
            route("ns/r#exact", vec![path(PathMatch::Exact("/exact".into()))], vec![(b("exact"), 1)]),
            route("ns/r#regex", vec![path(PathMatch::Regex("/items/[0-9]+".into()))], vec![(b("regex"), 1)]),
            route(
                "ns/r#header",
                vec![RouteMatch {
                    path: Some(PathMatch::Prefix("/h".into())),
                    headers: vec![value("x-tier", StringMatch::Exact("gold".into()))],
                    ..Default::default()
                }],
                vec![(b("header"), 1)],
            ),
            route(
                "ns/r#query",
                vec![RouteMatch {
                    path: Some(PathMatch::Prefix("/q".into())),
                    query: vec![value("v", StringMatch::Regex("2|3".into()))],
                    ..Default::default()
                }],
                vec![(b("query"), 1)],
            ),
            route(
                "ns/r#method",
                vec![RouteMatch {
                    path: Some(PathMatch::Prefix("/m".into())),
                    method: Some("POST".into()),
                    ..Default::default()
                }],
                vec![(b("method"), 1)],
            ),
            prefix,
        ];
        let wp = waypoint(config(routes, b("default")), Settings::default(), CLIENT_ID).await;
        for (client, upstream_version) in
            [(Client::h1(wp.addr).await, "HTTP/1.1"), (Client::h2(wp.addr).await, "HTTP/2.0")]
        {
            let to = |r: &Reply| (r.status, r.header("x-backend").to_string());
            let ok = |name: &str| (StatusCode::OK, name.to_string());
            let none = (StatusCode::NOT_FOUND, String::new());
            assert_eq!(to(&client.get("/exact", &[]).await), ok("exact"));
            assert_eq!(to(&client.get("/exact/more", &[]).await), none);
            assert_eq!(to(&client.get("/items/42", &[]).await), ok("regex"));
            assert_eq!(to(&client.get("/items/42x", &[]).await), none);
            assert_eq!(to(&client.get("/h", &[("x-tier", "gold")]).await), ok("header"));
            assert_eq!(to(&client.get("/h", &[("x-tier", "silver")]).await), none);
            assert_eq!(to(&client.get("/q?a=1&v=3", &[]).await), ok("query"));
            assert_eq!(to(&client.get("/q?v=1", &[]).await), none);
            let post = Request::post("/m").header("host", "svc.test").body(palisade_waypoint::body::empty()).unwrap();
            assert_eq!(to(&client.send(post).await), ok("method"));
            assert_eq!(to(&client.get("/m", &[]).await), none);
            assert_eq!(to(&client.get("/apix", &[]).await), none, "a prefix matches whole segments");

            let r = client.get("/api/users?id=7", &[]).await;
            assert_eq!(to(&r), ok("prefix"));
            assert_eq!(r.header("x-path"), "/v2/users?id=7", "prefix rewritten, query kept");
            assert_eq!(r.header("x-host"), "rewritten.test");
            assert_eq!(r.header("x-added"), "yes");
            assert_eq!(r.header("x-resp"), "set");
            assert_eq!(r.header("x-version"), upstream_version, "the upstream speaks what the client spoke");
            let trace = r.header("x-traceparent");
            assert!(trace.starts_with("00-") && trace.len() == 55, "a traceparent is added: {trace:?}");

            let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let r = client.get("/exact", &[("traceparent", given)]).await;
            assert!(
                r.header("x-traceparent").starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "trace id propagated"
            );

            let r = client.get("/old?x=1", &[]).await;
            assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
            assert_eq!(r.header("location"), "http://svc.test/new?x=1");
        }
        let metrics = wp.metrics();
        let exact =
            r#"waypoint_requests_total{service="ns/svc",route="ns/r#exact",backend="ns/exact:80",status="200"} 4"#;
        assert!(metrics.contains(exact), "request count by route, backend and status:\n{metrics}");
        assert!(metrics.contains("waypoint_request_duration_seconds_count{service=\"ns/svc\",route=\"ns/r#exact\""));
        assert_eq!(servers["default"].hits(), 0, "routes exist, so nothing falls back to the default backend");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_90_10_within_two_points_over_10000_requests() {
    bounded(120, async {
        let a = serve_backend("a", echo("a")).await;
        let b = serve_backend("b", echo("b")).await;
        let ba = backend("ns/a:80", vec![a.endpoint()], TrafficPolicy::default());
        let bb = backend("ns/b:80", vec![b.endpoint()], TrafficPolicy::default());
        let routes = vec![route("ns/split#0", vec![], vec![(ba.clone(), 90), (bb, 10)])];
        let wp = waypoint(config(routes, ba), Settings::default(), CLIENT_ID).await;
        let client = Client::h2(wp.addr).await;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..25 {
            let client = client.clone();
            workers.spawn(async move {
                let mut to_a = 0u32;
                for _ in 0..400 {
                    let r = client.get("/", &[]).await;
                    assert_eq!(r.status, StatusCode::OK);
                    to_a += u32::from(r.header("x-backend") == "a");
                }
                to_a
            });
        }
        let to_a: u32 = workers.join_all().await.into_iter().sum();
        let share = f64::from(to_a) / 10_000.0;
        assert!((0.88..=0.92).contains(&share), "backend a got {share} of requests, expected 0.90 ± 0.02");
        assert_eq!(a.hits() + b.hits(), 10_000);
    })
    .await;
}

fn deny_admin_allow_web() -> Vec<AuthzPolicy> {
    vec![
        AuthzPolicy {
            name: "ns/deny-admin".into(),
            action: AuthzAction::Deny,
            rules: vec![AuthzRule {
                to: vec![AuthzOperation { paths: vec!["/admin*".into()], ..Default::default() }],
                ..Default::default()
            }],
        },
        AuthzPolicy {
            name: "ns/allow-web".into(),
            action: AuthzAction::Allow,
            rules: vec![AuthzRule {
                from: vec![AuthzSource { principals: vec!["td/ns/web/sa/*".into()], ..Default::default() }],
                ..Default::default()
            }],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_deny_answers_403_and_the_access_log_names_the_rule() {
    bounded(30, async {
        let app = serve_backend("app", echo("app")).await;
        let mut cfg = config(vec![], backend("ns/app:80", vec![app.endpoint()], TrafficPolicy::default()));
        cfg.services[0].authorization = deny_admin_allow_web();
        let wp = waypoint(cfg.clone(), Settings::default(), CLIENT_ID).await;
        let mut log = wp.engine.access_records();
        let client = Client::h1(wp.addr).await;

        let r = client.get("/admin/users", &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(!body.contains("deny-admin") && !body.contains("ns/"), "the 403 names no policy: {body:?}");
        let rec = log.recv().await.expect("access record");
        assert_eq!((rec.status, rec.authz_verdict), (403, "deny"));
        assert_eq!(rec.authz_rule.as_deref(), Some("ns/deny-admin#0"));
        assert_eq!(rec.source_identity.as_deref(), Some(CLIENT_ID));
        assert_eq!(rec.upstream, None);

        let r = client.get("/home", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        let rec = log.recv().await.expect("access record");
        assert_eq!((rec.status, rec.authz_verdict, rec.authz_rule.as_deref()), (200, "allow", Some("ns/allow-web#0")));
        assert_eq!(rec.upstream, Some(app.addr));
        assert_eq!(rec.route.as_deref(), Some("default"));
        assert_eq!(app.hits(), 1, "the denied request never reached the backend");

        // Another source identity is not in the ALLOW policy: denied at L7 and at L4.
        let other = waypoint(cfg, Settings::default(), "spiffe://td/ns/other/sa/x").await;
        let mut other_log = other.engine.access_records();
        let r = Client::h2(other.addr).await.get("/home", &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(
            other_log.recv().await.unwrap().authz_rule.as_deref(),
            Some(palisade_waypoint::authz::NO_ALLOW_MATCH)
        );
        let mut tcp = tokio::net::TcpStream::connect(other.addr).await.unwrap();
        tcp.write_all(b"\x00\x01binary").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(tcp.read(&mut buf).await.unwrap_or(0), 0, "an L4 deny closes the stream");
        assert_eq!(app.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_gets_a_copy_and_its_answer_is_dropped() {
    bounded(30, async {
        let app = serve_backend("app", echo("app")).await;
        let shadow =
            serve_backend("shadow", status_handler("shadow", StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO)).await;
        let main = backend("ns/app:80", vec![app.endpoint()], TrafficPolicy::default());
        let mut r = route("ns/mirror#0", vec![], vec![(main.clone(), 1)]);
        r.filters = vec![Filter::Mirror(backend("ns/shadow:80", vec![shadow.endpoint()], TrafficPolicy::default()))];
        let wp = waypoint(config(vec![r], main), Settings::default(), CLIENT_ID).await;
        let client = Client::h1(wp.addr).await;
        let post =
            Request::post("/orders").header("host", "svc.test").body(palisade_waypoint::body::full("{}")).unwrap();
        let reply = client.send(post).await;
        assert_eq!((reply.status, reply.header("x-backend")), (StatusCode::OK, "app"), "the mirror's 500 is dropped");
        until(|| shadow.hits() == 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_passes_through_as_tcp_to_the_default_backend() {
    bounded(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _echo = AbortOnDrop(tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        }));
        let ep = palisade_model::waypoint::config::BackendEndpoint {
            workload: "ns/echo".into(),
            address: addr,
            identity: "spiffe://td/ns/ns/sa/echo".into(),
        };
        let wp = waypoint(
            config(vec![], backend("ns/echo:80", vec![ep], TrafficPolicy::default())),
            Settings::default(),
            CLIENT_ID,
        )
        .await;
        let mut s = tokio::net::TcpStream::connect(wp.addr).await.unwrap();
        let message = b"\x16\x03\x01 not http at all";
        s.write_all(message).await.unwrap();
        let mut buf = vec![0u8; message.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, message);
    })
    .await;
}

/// A gRPC unary call's shape: HTTP/2, `te: trailers`, a length-prefixed message of unknown
/// length, and the status in trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shaped_http2_request_with_trailers_passes() {
    bounded(30, async {
        let handler: Handler = Arc::new(|req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let ok = req.headers().get("te").is_some_and(|v| v == "trailers")
                    && req.headers().get("content-type").is_some_and(|v| v == "application/grpc");
                let collected = req.into_body().collect().await.unwrap();
                let got_trailer = collected.trailers().and_then(|t| t.get("x-req-trailer")).is_some();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", if ok { "0" } else { "3" }.parse().unwrap());
                trailers
                    .insert("grpc-message", if got_trailer { "trailer-seen" } else { "no-trailer" }.parse().unwrap());
                let mut resp = Response::new(frames(collected.to_bytes(), trailers));
                resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                resp
            })
        });
        let grpc = serve_backend("grpc", handler).await;
        let cfg = config(vec![], backend("ns/grpc:50051", vec![grpc.endpoint()], TrafficPolicy::default()));
        let wp = waypoint(cfg, Settings::default(), CLIENT_ID).await;
        let client = Client::h2(wp.addr).await;
        let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
        let mut req_trailers = HeaderMap::new();
        req_trailers.insert("x-req-trailer", "1".parse().unwrap());
        let body = frames(message.clone(), req_trailers);
        let req = Request::post("http://svc.test/pkg.Greeter/SayHello")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let r = client.send(req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, message, "the message comes back whole");
        let trailers = r.trailers.expect("response trailers pass through");
        assert_eq!(trailers["grpc-status"], "0", "te: trailers and content-type reached the backend");
        assert_eq!(trailers["grpc-message"], "trailer-seen", "request trailers reached the backend");
    })
    .await;
}

/// A body of ready frames: data then trailers, as a gRPC peer sends them.
struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn frames(data: Bytes, trailers: HeaderMap) -> ProxyBody {
    boxed(Frames([hyper::body::Frame::data(data), hyper::body::Frame::trailers(trailers)].into()))
}
