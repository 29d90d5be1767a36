//! How the waypoint reaches an endpoint. The engine never opens sockets itself: the caller
//! supplies an [`Upstream`], so production dials HBONE through the endpoint's ztunnel with the
//! waypoint's own identity (checking the endpoint's SPIFFE ID) while tests dial plain TCP on
//! loopback — the HTTP pooling, limits and retries above it are the same code in both.
use std::future::Future;
use std::io;
use std::pin::Pin;

use palisade_model::waypoint::config::BackendEndpoint;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to or from a peer (TCP, an HBONE stream, a TLS stream…).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type BoxedIo = Box<dyn Io>;

/// A boxed future rather than `async fn` in the trait: the engine holds the upstream as
/// `Arc<dyn Upstream>`, which needs an object-safe trait.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send + 'a>>;

pub trait Upstream: Send + Sync {
    /// Opens one connection to `endpoint` (its address and target port). The engine pools
    /// what this returns and applies the connect timeout around it.
    fn connect<'a>(&'a self, endpoint: &'a BackendEndpoint) -> ConnectFuture<'a>;
}

/// Plain TCP to the endpoint's address: for tests and for a waypoint that shares a trust
/// boundary with its backends. It does not check the endpoint's identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainTcp;

impl Upstream for PlainTcp {
    fn connect<'a>(&'a self, endpoint: &'a BackendEndpoint) -> ConnectFuture<'a> {
        Box::pin(async move {
            let stream = TcpStream::connect(endpoint.address).await?;
            // Requests are small writes followed by a wait for the answer: Nagle would add
            // a delayed-ACK round to each.
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}
