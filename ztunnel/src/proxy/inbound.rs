//! Inbound plaintext: connections arriving at a pod's address from outside the pod, handed
//! to this listener by the `sk_lookup` program after it allowed them. The accepted socket's
//! local address is the original destination; ztunnel connects to it from inside the pod
//! (over the pod's loopback, which the steering program leaves alone).
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{Decided, PodNet, ProxyCtx, carry};
use crate::metrics::Direction;

pub async fn serve(listener: TcpListener, pod: Arc<PodNet>, ctx: Arc<ProxyCtx>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(pod = %pod.name, error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(dst) = client.local_addr() else { continue };
        // The kernel already allowed it; name the deciding rule the same way it did.
        let v = ctx.snapshot.borrow().verdict(peer.ip(), dst.ip(), dst.port());
        let (pod, ctx) = (pod.clone(), ctx.clone());
        tokio::spawn(async move {
            let decided = Decided { src_identity: v.src_identity, dst_identity: v.dst_identity, rule: v.rule };
            carry(&ctx, &pod, Direction::Inbound, client, peer, dst, decided).await;
        });
    }
}
