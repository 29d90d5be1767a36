//! One way to accept connections, for every listener (ztunnel's data path, its admin and
//! enrollment sockets, the CA).
//!
//! `accept(2)` fails for two kinds of reasons. A connection that was reset while it waited in
//! the queue (`ECONNABORTED`, `ECONNRESET`, `EPROTO`...) concerns that connection only: the
//! next one is tried at once. Anything else — above all `EMFILE`/`ENFILE` when descriptors run
//! out — will fail again immediately, and retrying in a tight loop spins a core while the
//! queue only grows. So those errors back off exponentially (from `BACKOFF_START` doubling to
//! `BACKOFF_MAX`, reset by the next success), are logged at most once per `LOG_EVERY` with a
//! count of the ones not logged, and are never returned: a listener that stops serving
//! because of a transient shortage is worse than one that serves late.
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// First pause after a resource error.
pub const BACKOFF_START: Duration = Duration::from_millis(5);
/// Longest pause between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per listener this often.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// Accept errors seen by every listener of the process since start (for metrics).
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Accept errors of all listeners of this process since start.
pub fn accept_errors_total() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// A listener: TCP and Unix listeners of tokio.
pub trait Listen {
    type Stream;
    type Addr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listen for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listen for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// A listener with its backoff and log state. `accept` never fails.
pub struct Acceptor<L> {
    listener: L,
    /// Names the listener in logs ("hbone 10.244.1.2:15008", "admin"...).
    name: String,
    backoff: Backoff,
}

impl<L: Listen> Acceptor<L> {
    pub fn new(name: impl Into<String>, listener: L) -> Self {
        Acceptor { listener, name: name.into(), backoff: Backoff::default() }
    }

    pub fn listener(&self) -> &L {
        &self.listener
    }

    pub fn into_inner(self) -> L {
        self.listener
    }

    /// The next connection; errors are counted, logged (rate-limited) and waited out.
    pub async fn accept(&mut self) -> (L::Stream, L::Addr) {
        accept_with_backoff(&self.listener, &self.name, &mut self.backoff).await
    }
}

/// Accepts from `listener` with the shared policy, keeping its state in `backoff` (for loops
/// that hold the listener themselves).
pub async fn accept_with_backoff<L: Listen>(listener: &L, name: &str, backoff: &mut Backoff) -> (L::Stream, L::Addr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.success();
                return accepted;
            }
            Err(e) => {
                if let Some(pause) = backoff.failure(name, &e, Instant::now()) {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Whether an accept error concerns only the connection being accepted.
fn per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error() == Some(EPROTO)
}

/// `EPROTO` on Linux (a protocol error on the connection being accepted).
const EPROTO: i32 = 71;

/// Backoff and log-rate state of one listener.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    fn success(&mut self) {
        self.next = None;
    }

    /// Records an error; returns how long to pause before the next attempt.
    fn failure(&mut self, name: &str, e: &io::Error, now: Instant) -> Option<Duration> {
        ERRORS.fetch_add(1, Ordering::Relaxed);
        let pause = if per_connection(e) {
            None
        } else {
            let pause = self.next.unwrap_or(BACKOFF_START);
            self.next = Some((pause * 2).min(BACKOFF_MAX));
            Some(pause)
        };
        if self.last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            let unlogged = std::mem::take(&mut self.unlogged);
            let pause_ms = pause.map_or(0, |p| p.as_millis());
            tracing::warn!(listener = name, error = %e, pause_ms, unlogged, "accept failed");
            self.last_log = Some(now);
        } else {
            self.unlogged += 1;
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

    #[test]
    fn resource_errors_back_off_exponentially_up_to_the_cap_and_reset_on_success() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let pauses: Vec<_> = (0..10).map(|_| b.failure("t", &emfile(), now).unwrap()).collect();
        assert_eq!(pauses[0], BACKOFF_START);
        assert_eq!(pauses[1], BACKOFF_START * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        b.success();
        assert_eq!(b.failure("t", &emfile(), now), Some(BACKOFF_START));
    }

    #[test]
    fn per_connection_errors_do_not_pause_and_logs_are_rate_limited() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failure("t", &aborted, now), None);
        assert_eq!(b.failure("t", &io::Error::from_raw_os_error(EPROTO), now), None);
        for _ in 0..100 {
            b.failure("t", &emfile(), now);
        }
        assert_eq!(b.unlogged, 101, "only the first error of the second is logged");
        b.failure("t", &emfile(), now + LOG_EVERY);
        assert_eq!(b.unlogged, 0);
    }

    #[tokio::test]
    async fn an_acceptor_serves_tcp_and_unix_listeners() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut acceptor = Acceptor::new("tcp", tcp);
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (_, peer) = acceptor.accept().await;
        assert_eq!(peer, client.await.unwrap().unwrap().local_addr().unwrap());

        let dir = std::env::temp_dir().join(format!("palisade-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let unix = tokio::net::UnixListener::bind(&path).unwrap();
        let mut backoff = Backoff::default();
        let connect = tokio::spawn(tokio::net::UnixStream::connect(path.clone()));
        let _ = accept_with_backoff(&unix, "unix", &mut backoff).await;
        connect.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
