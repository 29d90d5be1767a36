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
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Bounds concurrent handshakes (TLS, then HTTP/2) of a listener or of a whole process: a
/// handshake costs a descriptor, a task and the TLS state (tens of KiB) while a client that
/// sends nothing holds it until its timeout. Over either bound the caller accepts and closes
/// at once, so that the kernel's accept queue keeps moving for legitimate clients.
pub struct HandshakeLimit {
    overall: usize,
    per_source: usize,
    state: Mutex<HandshakeState>,
    refused: AtomicU64,
}

#[derive(Default)]
struct HandshakeState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a handshake was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Overall,
    PerSource,
}

impl HandshakeLimit {
    pub fn new(overall: usize, per_source: usize) -> Arc<Self> {
        Arc::new(HandshakeLimit { overall, per_source, state: Mutex::default(), refused: AtomicU64::new(0) })
    }

    /// A permit for one handshake from `source`, held until the handshake ends (drop).
    pub fn try_admit(self: &Arc<Self>, source: IpAddr) -> Result<HandshakePermit, Refused> {
        let mut state = self.state.lock().expect("handshake limit");
        let refused = if state.total >= self.overall {
            Some(Refused::Overall)
        } else if state.by_source.get(&source).is_some_and(|n| *n >= self.per_source) {
            Some(Refused::PerSource)
        } else {
            None
        };
        if let Some(why) = refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(why);
        }
        state.total += 1;
        *state.by_source.entry(source).or_default() += 1;
        Ok(HandshakePermit { limit: self.clone(), source })
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.state.lock().expect("handshake limit").total
    }

    /// Handshakes refused since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One admitted handshake; dropping it frees the slot.
pub struct HandshakePermit {
    limit: Arc<HandshakeLimit>,
    source: IpAddr,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut state = self.limit.state.lock().expect("handshake limit");
        state.total -= 1;
        if let Some(n) = state.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.by_source.remove(&self.source);
            }
        }
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

    #[test]
    fn handshakes_are_bounded_per_source_and_overall_and_slots_come_back() {
        let limit = HandshakeLimit::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = limit.try_admit(a).unwrap();
        let _a2 = limit.try_admit(a).unwrap();
        assert_eq!(limit.try_admit(a).err(), Some(Refused::PerSource));
        let _b1 = limit.try_admit(b).unwrap();
        assert_eq!(limit.try_admit(b).err(), Some(Refused::Overall));
        assert_eq!(limit.refused_total(), 2);
        drop(a1);
        assert_eq!(limit.in_progress(), 2);
        let _b2 = limit.try_admit(b).unwrap();
        assert!(limit.state.lock().unwrap().by_source.len() == 2);
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
