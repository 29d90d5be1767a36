//! Network namespaces of enrolled pods: ztunnel stays in its own (the node's) namespace and
//! creates the sockets it needs inside a pod's namespace by switching the calling thread there
//! for the duration of one `socket()`/`bind()` call. A socket keeps the namespace it was
//! created in, so the rest of its life is ordinary tokio I/O.
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

/// The namespace ztunnel started in; threads always return to it.
fn home() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").expect("open /proc/self/ns/net"))
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    cookie: u64,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file =
            File::open(path).map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        home();
        let mut ns = Netns { file, cookie: 0 };
        ns.cookie = ns.run(|| {
            let s = raw_socket(libc::AF_INET)?;
            netns_cookie_of(s.as_fd())
        })??;
        Ok(ns)
    }

    /// The kernel's cookie for this namespace (what `bpf_get_netns_cookie` returns).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on this thread while it is inside the namespace, then switches back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.file.as_fd())?;
        let out = f();
        // Failing to return would leave a tokio worker in a pod's namespace: unrecoverable.
        setns(home().as_fd()).expect("return to ztunnel's network namespace");
        Ok(out)
    }

    /// A non-blocking TCP socket in this namespace, ready for `connect`.
    pub fn tcp_socket(&self, for_addr: &SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let family = if for_addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let fd = self.run(|| raw_socket(family))??;
        let std = std::net::TcpStream::from(fd);
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }

    /// A listening socket bound inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = self.run(|| -> io::Result<tokio::net::TcpSocket> {
            let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            Ok(s)
        })??;
        socket.listen(1024)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the namespace a socket lives in.
pub fn netns_cookie_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_cookie() {
        let a = Netns::open(Path::new("/proc/self/ns/net")).expect("open own netns");
        let b = Netns::open(Path::new("/proc/self/ns/net")).expect("open own netns");
        assert_ne!(a.cookie(), 0);
        assert_eq!(a.cookie(), b.cookie());
    }
}
