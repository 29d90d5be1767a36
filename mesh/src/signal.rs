//! The end of a data-plane process (ztunnel, waypoint): SIGTERM (Kubernetes stopping the pod)
//! or SIGINT (a terminal).

/// Returns when the process is asked to stop.
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
