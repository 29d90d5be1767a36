//! The enrollment protocol without a kernel: request parsing, the bounded line reader, and
//! the limits of a connection over a real Unix socket. The replies come from a dispatcher
//! that serves `list` only: enrolling needs network namespaces and cgroups, which the
//! end-to-end tests cover.
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::*;

#[test]
fn parse_request_reads_each_operation() {
    let enroll = br#"{"op":"enroll","pod":{"uid":"u1","name":"p","netns":"/run/netns/x","cgroup":"/sys/fs/cgroup/x","ips":["10.244.1.10"]}}"#;
    match parse_request(enroll) {
        Ok(Request::Enroll { pod }) => {
            assert_eq!((pod.uid.as_str(), pod.ips.len()), ("u1", 1));
        }
        other => panic!("enroll parsed as {other:?}"),
    }
    assert!(matches!(parse_request(br#"{"op":"remove","uid":"u1"}"#), Ok(Request::Remove { uid }) if uid == "u1"));
    assert!(matches!(parse_request(br#"{"op":"list"}"#), Ok(Request::List)));
}

#[test]
fn parse_request_names_what_is_wrong() {
    let cases: &[(&[u8], &str)] = &[
        (b"{not json", "key must be a string"),
        (b"42", "expected internally tagged enum"),
        (br#"{"op":"reboot"}"#, "unknown variant `reboot`"),
        (br#"{"op":"remove"}"#, "missing field `uid`"),
        (br#"{"op":"enroll","pod":{"uid":"u","name":"p","netns":"/n","cgroup":"/c","ips":["10.1"]}}"#, "invalid IP"),
        (b"{\"op\":\"remove\",\"uid\":\"\xff\"}", "invalid unicode"),
        (b"", "EOF"),
    ];
    for (line, want) in cases {
        let error = parse_request(line).expect_err("accepted");
        assert!(
            error.starts_with("bad request: ") && error.contains(want),
            "{:?}: {error}",
            String::from_utf8_lossy(line)
        );
    }
}

async fn lines_of(input: &[u8], max: usize) -> Vec<Result<String, String>> {
    let mut reader = BufReader::with_capacity(7, input); // small chunks: lines span several
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_line(&mut reader, max, &mut buf).await {
            Ok(true) => out.push(Ok(String::from_utf8(buf.clone()).unwrap())),
            Ok(false) => return out,
            Err(e) => {
                out.push(Err(e.to_string()));
                return out;
            }
        }
    }
}

#[tokio::test]
async fn read_line_is_bounded() {
    let ok = |s: &str| Ok(s.to_string());
    assert_eq!(lines_of(b"ab\r\n0123456789\nlast", 10).await, vec![ok("ab"), ok("0123456789"), ok("last")]);
    assert_eq!(lines_of(b"\n\n", 10).await, vec![ok(""), ok("")]);
    assert_eq!(lines_of(b"", 10).await, vec![]);
    let too_long = Err("request line longer than 10 bytes".to_string());
    assert_eq!(lines_of(b"ab\n01234567890\nnext\n", 10).await, vec![ok("ab"), too_long.clone()]);
    // No newline at all: refused once the bound is passed, not at the end of the stream.
    assert_eq!(lines_of(&[b'x'; 1000], 10).await, vec![too_long]);
}

/// An enrollment socket in a fresh directory, removed on drop (also when the test fails).
struct Socket {
    dir: PathBuf,
    path: PathBuf,
    served: Arc<AtomicUsize>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn list_only(request: Request) -> Reply {
    match request {
        Request::List => Reply { ok: true, pods: Some(vec![]), ..Default::default() },
        other => Reply { error: Some(format!("not served by this test: {other:?}")), ..Default::default() },
    }
}

fn start(limits: Limits, slots: usize) -> Socket {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("plsd-enroll-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("enroll.sock");
    let listener = bind(&path).expect("bind the enrollment socket");
    let slots = Arc::new(Semaphore::new(slots));
    let served = Arc::new(AtomicUsize::new(0));
    let finished = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (limits, slots, finished) = (limits.clone(), slots.clone(), finished.clone());
            tokio::spawn(async move {
                serve_lines(stream, &limits, &slots, list_only).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Socket { dir, path, served }
}

struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// Every wait of a test is bounded: a server that hangs fails the test instead of blocking it.
const BOUND: Duration = Duration::from_secs(10);

impl Client {
    async fn connect(socket: &Socket) -> Client {
        let stream = UnixStream::connect(&socket.path).await.expect("connect");
        let (read, writer) = stream.into_split();
        Client { reader: BufReader::new(read), writer }
    }

    /// Sends `bytes` (write errors ignored: the server may close while a long line arrives).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes).await;
    }

    async fn reply(&mut self) -> serde_json::Value {
        let mut line = String::new();
        tokio::time::timeout(BOUND, self.reader.read_line(&mut line)).await.expect("a reply in time").expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// True once the server has closed the connection.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, self.reader.read_to_end(&mut rest)).await.expect("closed in time").is_ok()
            && rest.is_empty()
    }
}

#[tokio::test]
async fn an_over_long_line_is_refused_and_the_connection_closed() {
    let socket = start(Limits::default(), 4);
    let mut client = Client::connect(&socket).await;
    client.send(b"{\"op\":\"list\"}\n").await;
    assert_eq!(client.reply().await, serde_json::json!({"ok": true, "pods": []}));
    client.send(b"garbage\n").await;
    let bad = client.reply().await;
    assert!(bad["error"].as_str().unwrap().starts_with("bad request"), "{bad}");
    // Exactly the limit is still a request (here: a list padded with spaces).
    let mut padded = b"{\"op\":\"list\"}".to_vec();
    padded.resize(MAX_LINE, b' ');
    padded.push(b'\n');
    client.send(&padded).await;
    assert_eq!(client.reply().await["ok"], true);
    let mut long = vec![b' '; MAX_LINE + 1];
    long.push(b'\n');
    client.send(&long).await;
    assert_eq!(client.reply().await, serde_json::json!({"ok": false, "error": "request line longer than 65536 bytes"}));
    assert!(client.closed().await, "the connection stayed open after an over-long line");
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_line_is_disconnected() {
    let socket = start(Limits { idle: Duration::from_millis(200), ..Limits::default() }, 4);
    let mut client = Client::connect(&socket).await;
    client.send(b"{\"op\":").await;
    let reply = client.reply().await;
    assert_eq!(reply["error"], "no complete request line within 0.2s", "{reply}");
    assert!(client.closed().await);
    // A silent one too.
    let mut silent = Client::connect(&socket).await;
    assert_eq!(silent.reply().await["ok"], false);
    assert!(silent.closed().await);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_until_one_ends() {
    let socket = start(Limits::default(), 2);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&socket).await;
        c.send(b"{\"op\":\"list\"}\n").await;
        assert_eq!(c.reply().await["ok"], true);
        held.push(c);
    }
    let mut over = Client::connect(&socket).await;
    let reply = over.reply().await;
    assert!(reply["error"].as_str().unwrap().contains("too many enrollment connections"), "{reply}");
    assert!(over.closed().await);
    drop(held.pop());
    // The server notices the end of the connection, then has a slot again.
    let deadline = tokio::time::Instant::now() + BOUND;
    while socket.served.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the ended connection was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut again = Client::connect(&socket).await;
    again.send(b"{\"op\":\"list\"}\n").await;
    assert_eq!(again.reply().await["ok"], true);
}
