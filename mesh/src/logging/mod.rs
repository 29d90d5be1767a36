//! The process's log (and access log) on stderr, for ztunnel and the waypoint alike.
//!
//! Lines are formatted on the thread that logs and appended to a shared buffer that a thread
//! of its own writes out in batches. Writing each line to stderr directly cost one `write(2)`
//! per request under the stderr lock that every worker thread takes (profiled: 3 % of the
//! waypoint's CPU at its maximum rate, plus lock contention); a channel per line
//! (`tracing-appender`'s non-blocking writer) cost more still, in wake-ups of its writer
//! thread (6 % of the waypoint's CPU). Here the writer is woken only by the first line after
//! a write, then waits [`GATHER`] for more: at most twenty writes a second however many
//! lines, and lines appear within [`GATHER`]. (With 5 ms, at 1,000 req/s the writer's two
//! wake-ups per batch were 4 % of the waypoint's CPU; Envoy flushes its access logs every
//! second by default.) If the log cannot keep up (stderr blocked, a
//! full disk), lines beyond [`MAX_BUFFERED`] are dropped rather than slowing the data path;
//! [`dropped_lines`] counts them for a metric. Lines still buffered when the process is
//! killed (SIGKILL) are lost: at most [`GATHER`]'s worth.
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

mod line;
pub use line::Line;

/// How long the writer waits for more lines after the first one of a batch.
pub const GATHER: Duration = Duration::from_millis(50);
/// Bytes buffered before new lines are dropped.
pub const MAX_BUFFERED: usize = 8 << 20;

static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The buffer of the installed logging, for lines formatted outside the subscriber ([`Line`]).
static SINK: OnceLock<Arc<Shared>> = OnceLock::new();
static JSON: AtomicBool = AtomicBool::new(false);

fn json() -> bool {
    JSON.load(Relaxed)
}

/// Appends one whole line to the log, as the subscriber's own lines are.
fn write_line(line: &[u8]) {
    match SINK.get() {
        Some(shared) => shared.append(line),
        None => {
            let _ = std::io::stderr().write_all(line);
        }
    }
}

/// Log lines dropped since start because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Relaxed)
}

#[derive(Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// Set when the process stops: the writer writes what is left and returns.
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic while appending leaves whole lines at worst: keep logging.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers a line (or drops and counts it when the buffer is full); wakes the writer for
    /// the first line of a batch.
    fn append(&self, line: &[u8]) {
        let mut buffer = self.lock();
        if buffer.bytes.len() + line.len() > MAX_BUFFERED {
            DROPPED.fetch_add(1, Relaxed);
            return;
        }
        let first = buffer.bytes.is_empty();
        buffer.bytes.extend_from_slice(line);
        drop(buffer);
        if first {
            self.wake.notify_one();
        }
    }
}

/// What `tracing-subscriber` writes each formatted line into.
#[derive(Clone)]
struct LineWriter(Arc<Shared>);

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        self.clone()
    }
}

/// Keeps the writer thread; dropping it writes out what is buffered (keep it for `main`'s
/// life).
pub struct Logging {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Logging {
    /// Installs the global subscriber: `RUST_LOG` (default `info`), JSON lines or text,
    /// colours only on a terminal.
    pub fn init(json: bool) -> Logging {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let ansi = std::io::stderr().is_terminal();
        let shared = Arc::new(Shared::default());
        JSON.store(json, Relaxed);
        let _ = SINK.set(shared.clone());
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_batches(&shared, &mut std::io::stderr()))
                .ok()
        };
        let builder =
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(LineWriter(shared.clone())).with_ansi(ansi);
        if json {
            builder.json().init();
        } else {
            builder.init();
        }
        Logging { shared, writer }
    }
}

impl Drop for Logging {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: waits for a first line, gathers for [`GATHER`], writes the batch.
fn write_batches(shared: &Shared, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut buffer = shared.lock();
            while buffer.bytes.is_empty() && !buffer.closing {
                buffer = shared.wake.wait(buffer).unwrap_or_else(|e| e.into_inner());
            }
            buffer.closing
        };
        if !closing {
            std::thread::sleep(GATHER);
        }
        let closing = {
            let mut buffer = shared.lock();
            std::mem::swap(&mut batch, &mut buffer.bytes);
            buffer.closing
        };
        // A write error (stderr closed) loses this batch; the next one tries again.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread writes to it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_nothing_is_left_behind_at_close() {
        let shared = Arc::new(Shared::default());
        let sink = Sink::default();
        let writer = {
            let (shared, mut sink) = (shared.clone(), sink.clone());
            std::thread::spawn(move || write_batches(&shared, &mut sink))
        };
        let mut lines = LineWriter(shared.clone());
        let expected: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        for line in expected.lines() {
            lines.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
        shared.lock().closing = true;
        shared.wake.notify_one();
        writer.join().unwrap();
        assert_eq!(String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(), expected);
    }

    #[test]
    fn a_writer_that_cannot_keep_up_drops_lines_and_counts_them() {
        let shared = Arc::new(Shared::default());
        let mut lines = LineWriter(shared.clone());
        let line = vec![b'x'; 1 << 20];
        let before = dropped_lines();
        // No writer thread: the buffer only fills.
        for _ in 0..(MAX_BUFFERED >> 20) + 3 {
            lines.write_all(&line).unwrap();
        }
        assert_eq!(shared.lock().bytes.len(), MAX_BUFFERED);
        assert!(dropped_lines() >= before + 3);
    }
}
