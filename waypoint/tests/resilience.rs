//! Load balancing, circuit breaking, outlier detection, retries and slow-client protection,
//! end to end with real hyper clients and backends on loopback. Time only bounds the tests;
//! nothing asserts how fast anything is.
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use palisade_model::waypoint::config::{
    ConnectionLimits, HashKey, LoadBalancer, OutlierDetection, PathMatch, RetryPolicy, TrafficPolicy,
};
use palisade_waypoint::Settings;
use palisade_waypoint::body::full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn lb(load_balancer: LoadBalancer) -> TrafficPolicy {
    TrafficPolicy { load_balancer, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_most_traffic_to_the_faster_backend() {
    bounded(120, async {
        let fast = serve_backend("fast", echo("fast")).await;
        let slow = serve_backend("slow", status_handler("slow", StatusCode::OK, Duration::from_millis(50))).await;
        let b = backend("ns/app:80", vec![fast.endpoint(), slow.endpoint()], lb(LoadBalancer::LeastRequest));
        let wp = waypoint(config(vec![], b), Settings::default(), CLIENT_ID).await;
        let client = Client::h2(wp.addr).await;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let client = client.clone();
            workers.spawn(async move {
                for _ in 0..25 {
                    assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
                }
            });
        }
        workers.join_all().await;
        let (f, s) = (fast.hits(), slow.hits());
        assert_eq!(f + s, 400);
        assert!(f > 2 * s, "the fast backend should get most requests: fast {f}, slow {s}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_keys_and_adding_a_backend_moves_about_one_in_n_plus_one() {
    bounded(120, async {
        let mut servers = Vec::new();
        for i in 0..4 {
            let name = format!("b{i}");
            servers.push(serve_backend(&name, echo(&name)).await);
        }
        let policy = lb(LoadBalancer::RingHash(HashKey::Header("x-user".into())));
        let cfg = |n: usize| {
            config(vec![], backend("ns/app:80", servers[..n].iter().map(|s| s.endpoint()).collect(), policy.clone()))
        };
        let wp = waypoint(cfg(3), Settings::default(), CLIENT_ID).await;
        let client = Client::h1(wp.addr).await;
        let keys: Vec<String> = (0..300).map(|k| format!("user-{k}")).collect();
        let mut before = HashMap::new();
        for key in &keys {
            let first = client.get("/", &[("x-user", key)]).await.header("x-backend").to_string();
            let again = client.get("/", &[("x-user", key)]).await.header("x-backend").to_string();
            assert_eq!(first, again, "key {key} stays on one backend");
            before.insert(key.clone(), first);
        }
        wp.engine.update(cfg(4)).expect("update");
        let mut moved = 0;
        for key in &keys {
            let now = client.get("/", &[("x-user", key)]).await.header("x-backend").to_string();
            if now != before[key] {
                assert_eq!(now, "b3", "key {key} moved between old backends");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / keys.len() as f64;
        assert!((0.12..=0.40).contains(&fraction), "{fraction} of keys moved; expected about 1/4");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_answers_503_at_once_while_saturated_and_recovers() {
    bounded(30, async {
        let entered = Arc::new(AtomicUsize::new(0));
        let (open, handler) = gated("app", &entered);
        let app = serve_backend("app", handler).await;
        let traffic = TrafficPolicy {
            limits: ConnectionLimits { max_active_requests: Some(2), ..Default::default() },
            ..Default::default()
        };
        let wp = waypoint(
            config(vec![], backend("ns/app:80", vec![app.endpoint()], traffic)),
            Settings::default(),
            CLIENT_ID,
        )
        .await;
        let mut held = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let client = Client::h1(wp.addr).await;
            held.spawn(async move { client.get("/", &[]).await.status });
        }
        until(|| entered.load(Ordering::SeqCst) == 2).await;
        let client = Client::h2(wp.addr).await;
        for _ in 0..5 {
            // These answer while the backend still holds the first two: nothing queued.
            let r = client.get("/", &[]).await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.header("x-palisade-overflow"), "max_active_requests");
        }
        assert_eq!(entered.load(Ordering::SeqCst), 2, "overflowing requests never reached the backend");
        open.send(true).unwrap();
        for status in held.join_all().await {
            assert_eq!(status, StatusCode::OK);
        }
        for _ in 0..5 {
            assert_eq!(client.get("/", &[]).await.status, StatusCode::OK, "recovered once load dropped");
        }
    })
    .await;
}

/// A backend that counts requests in and holds each until `open` says true.
fn gated(name: &str, entered: &Arc<AtomicUsize>) -> (tokio::sync::watch::Sender<bool>, Handler) {
    let (open, gate) = tokio::sync::watch::channel(false);
    let (seen, name) = (Arc::clone(entered), name.to_string());
    let handler: Handler = Arc::new(move |_req: Request<Incoming>| {
        let (mut gate, seen, name) = (gate.clone(), Arc::clone(&seen), name.clone());
        Box::pin(async move {
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = gate.wait_for(|open| *open).await;
            let mut resp = Response::new(full("done"));
            resp.headers_mut().insert("x-backend", name.parse().unwrap());
            resp
        })
    });
    (open, handler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_update_moves_new_requests_and_fails_none_in_flight() {
    bounded(30, async {
        let entered = Arc::new(AtomicUsize::new(0));
        let (open, handler) = gated("old", &entered);
        let old = serve_backend("old", handler).await;
        let new = serve_backend("new", echo("new")).await;
        let cfg = |ep| config(vec![], backend("ns/app:80", vec![ep], TrafficPolicy::default()));
        let wp = waypoint(cfg(old.endpoint()), Settings::default(), CLIENT_ID).await;
        let client = Client::h2(wp.addr).await;
        let in_flight = {
            let client = client.clone();
            tokio::spawn(async move { client.get("/", &[]).await })
        };
        until(|| entered.load(Ordering::SeqCst) == 1).await;
        wp.engine.update(cfg(new.endpoint())).expect("update");
        assert_eq!(client.get("/", &[]).await.header("x-backend"), "new");
        open.send(true).unwrap();
        let held = in_flight.await.unwrap();
        assert_eq!((held.status, held.header("x-backend")), (StatusCode::OK, "old"), "the request in flight finished");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_answers_503_when_every_upstream_connection_is_busy() {
    bounded(30, async {
        let entered = Arc::new(AtomicUsize::new(0));
        let (open, handler) = gated("app", &entered);
        let app = serve_backend("app", handler).await;
        let traffic = TrafficPolicy {
            limits: ConnectionLimits { max_connections: Some(1), ..Default::default() },
            ..Default::default()
        };
        let wp = waypoint(
            config(vec![], backend("ns/app:80", vec![app.endpoint()], traffic)),
            Settings::default(),
            CLIENT_ID,
        )
        .await;
        let first = Client::h1(wp.addr).await;
        let held = tokio::spawn(async move { first.get("/", &[]).await.status });
        until(|| entered.load(Ordering::SeqCst) == 1).await;
        // HTTP/1.1 upstream connections carry one request at a time: the only one is busy.
        let r = Client::h1(wp.addr).await.get("/", &[]).await;
        assert_eq!((r.status, r.header("x-palisade-overflow")), (StatusCode::SERVICE_UNAVAILABLE, "max_connections"));
        open.send(true).unwrap();
        assert_eq!(held.await.unwrap(), StatusCode::OK);
        // The connection went back to the pool: the next request reuses it within the limit.
        until_async(|| async { Client::h1(wp.addr).await.get("/", &[]).await.status == StatusCode::OK }).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_5xx_is_ejected_and_later_returned() {
    bounded(60, async {
        let status = Arc::new(AtomicU16::new(500));
        let current = Arc::clone(&status);
        let bad_handler: Handler = Arc::new(move |_req: Request<Incoming>| {
            let code = current.load(Ordering::SeqCst);
            Box::pin(async move {
                let mut resp = Response::new(full("bad"));
                *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                resp.headers_mut().insert("x-backend", "bad".parse().unwrap());
                resp
            })
        });
        let bad = serve_backend("bad", bad_handler).await;
        let good = serve_backend("good", echo("good")).await;
        let traffic = TrafficPolicy {
            outlier: Some(OutlierDetection {
                consecutive_5xx: Some(3),
                consecutive_gateway_errors: None,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(1),
                max_ejection_percent: 50,
            }),
            ..Default::default()
        };
        let b = backend("ns/app:80", vec![bad.endpoint(), good.endpoint()], traffic);
        let wp = waypoint(config(vec![], b), Settings::default(), CLIENT_ID).await;
        let client = Client::h1(wp.addr).await;
        for _ in 0..8 {
            client.get("/", &[]).await;
        }
        assert_eq!(bad.hits(), 3, "ejected after three consecutive 5xx");
        for _ in 0..10 {
            assert_eq!(client.get("/", &[]).await.header("x-backend"), "good");
        }
        assert_eq!(bad.hits(), 3, "no traffic while ejected");
        status.store(200, Ordering::SeqCst);
        until_async(|| async { client.get("/", &[]).await.header("x-backend") == "bad" }).await;
        let state = wp.engine.backend("ns/app:80").expect("backend state");
        assert!(state.endpoints().iter().all(|e| !e.outlier.is_ejected(std::time::Instant::now())));
    })
    .await;
}

async fn until_async<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    while !check().await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_failing_endpoint() {
    bounded(60, async {
        let refused: SocketAddr = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let unavailable = serve_backend(
            "unavailable",
            status_handler("unavailable", StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO),
        )
        .await;
        let good = serve_backend("good", echo("good")).await;
        let mut closed = good.endpoint();
        closed.address = refused;
        closed.workload = "ns/closed".into();
        let b = backend("ns/app:80", vec![closed, unavailable.endpoint(), good.endpoint()], TrafficPolicy::default());
        let mut r = route("ns/retry#0", vec![], vec![(b.clone(), 1)]);
        r.retry = Some(RetryPolicy {
            attempts: 2,
            codes: vec![503],
            backoff: Duration::from_millis(5),
            non_idempotent: false,
        });
        let wp = waypoint(config(vec![r], b), Settings::default(), CLIENT_ID).await;
        let mut log = wp.engine.access_records();
        let client = Client::h1(wp.addr).await;
        let mut retried = 0;
        for _ in 0..30 {
            let r = client.get("/", &[]).await;
            assert_eq!((r.status, r.header("x-backend")), (StatusCode::OK, "good"));
            retried += u32::from(log.recv().await.unwrap().attempts > 1);
        }
        assert!(retried > 0 && unavailable.hits() > 0, "some first attempts failed and were retried");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_answers_with_the_overflow_header() {
    bounded(30, async {
        let failing =
            serve_backend("failing", status_handler("failing", StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)).await;
        let traffic = TrafficPolicy {
            limits: ConnectionLimits { max_active_retries: Some(0), ..Default::default() },
            ..Default::default()
        };
        let b = backend("ns/app:80", vec![failing.endpoint()], traffic);
        let mut r = route("ns/retry#0", vec![], vec![(b.clone(), 1)]);
        r.retry = Some(RetryPolicy {
            attempts: 3,
            codes: vec![503],
            backoff: Duration::from_millis(5),
            non_idempotent: false,
        });
        let wp = waypoint(config(vec![r], b), Settings::default(), CLIENT_ID).await;
        let reply = Client::h1(wp.addr).await.get("/", &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("x-palisade-overflow"), "max_active_retries");
        assert_eq!(failing.hits(), 1, "no retry without budget");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_and_request_timeouts_answer_504() {
    bounded(30, async {
        let stuck = serve_backend("stuck", status_handler("stuck", StatusCode::OK, Duration::from_secs(60))).await;
        let b = backend("ns/app:80", vec![stuck.endpoint()], TrafficPolicy::default());
        let mut per_try = route("ns/t#backend", vec![path(PathMatch::Prefix("/backend".into()))], vec![(b.clone(), 1)]);
        per_try.backend_timeout = Some(Duration::from_millis(200));
        let mut whole = route("ns/t#request", vec![path(PathMatch::Prefix("/request".into()))], vec![(b.clone(), 1)]);
        whole.request_timeout = Some(Duration::from_millis(200));
        let wp = waypoint(config(vec![per_try, whole], b), Settings::default(), CLIENT_ID).await;
        let mut log = wp.engine.access_records();
        let client = Client::h2(wp.addr).await;
        assert_eq!(client.get("/backend", &[]).await.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(client.get("/request", &[]).await.status, StatusCode::GATEWAY_TIMEOUT);
        for route in ["ns/t#backend", "ns/t#request"] {
            let rec = log.recv().await.unwrap();
            assert_eq!((rec.route.as_deref(), rec.status), (Some(route), 504));
        }
    })
    .await;
}

/// Sends `bytes` one per second until the peer closes; returns whether it was closed by the
/// engine (reads EOF or an error).
async fn slow_client(addr: SocketAddr, fast_prefix: &'static [u8], slow: &'static [u8]) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else { return true };
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(fast_prefix).await;
        for b in slow {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await;
    });
    let mut buf = [0u8; 512];
    let closed = loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break true,
            Ok(_) => continue,
        }
    };
    writer.abort();
    closed
}

async fn try_get(addr: SocketAddr) -> Option<StatusCode> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let req = Request::get("/").header("host", "svc.test").body(palisade_waypoint::body::empty()).ok()?;
        Some(sender.send_request(req).await.ok()?.status())
    };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_at_the_header_timeout_and_cannot_exhaust_the_engine() {
    bounded(60, async {
        let app = serve_backend("app", echo("app")).await;
        let settings =
            Settings { header_read_timeout: Duration::from_secs(1), max_connections: 16, ..Default::default() };
        let wp = waypoint(
            config(vec![], backend("ns/app:80", vec![app.endpoint()], TrafficPolicy::default())),
            settings,
            CLIENT_ID,
        )
        .await;
        const HEAD: &[u8] =
            b"GET / HTTP/1.1\r\nHost: svc.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        // Stalls in the first bytes (protocol detection) and after the request line (hyper's
        // header read timeout): both are closed, well before their headers could complete.
        let first = tokio::time::timeout(Duration::from_secs(10), slow_client(wp.addr, b"", HEAD));
        let later =
            tokio::time::timeout(Duration::from_secs(10), slow_client(wp.addr, b"GET / HTTP/1.1\r\n", &HEAD[16..]));
        let (first, later) = tokio::join!(first, later);
        assert_eq!(first, Ok(true), "a client slow from its first byte is closed");
        assert_eq!(later, Ok(true), "a client slow in its headers is closed");

        let mut loris = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let addr = wp.addr;
            loris.spawn(tokio::time::timeout(Duration::from_secs(15), slow_client(addr, b"", HEAD)));
        }
        // While they trickle, a normal client gets served (perhaps after a refusal or two).
        let mut served = None;
        while served.is_none() {
            served = try_get(wp.addr).await;
            if served.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert_eq!(served, Some(StatusCode::OK));
        for closed in loris.join_all().await {
            assert_eq!(closed, Ok(true), "every slow client is closed by the engine");
        }
        until(|| wp.engine.connections() == 0).await;
    })
    .await;
}
