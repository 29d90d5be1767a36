//! Small system helpers: running commands, cgroup v2, network namespaces.
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{program} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Writes a sysctl inside a network namespace.
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run("ip", &["netns", "exec", netns, "sh", "-c", &format!("echo {value} > {path}")]).map(|_| ())
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo (it is
/// /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    for line in info.lines() {
        // <id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> <source> ...
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo: Palisade needs cgroup v2")
}

/// Kills every process in a cgroup subtree and removes its directories, deepest first.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        // Killed processes leave their cgroup asynchronously.
        let mut tries = 0;
        while let Err(e) = std::fs::remove_dir(&d) {
            if e.kind() == std::io::ErrorKind::NotFound {
                break;
            }
            tries += 1;
            if tries > 200 {
                bail!("remove cgroup {}: {e}", d.display());
            }
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Moves the calling process into a cgroup (for `pre_exec`: async-signal-safe enough, it only
/// opens and writes a file).
pub fn join_cgroup(procs_file: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: raw open/write/close on a NUL-terminated path; no allocation.
    unsafe {
        let fd = libc::open(procs_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if rc != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered the network namespace `/run/netns/<name>`
/// (sockets made there stay in that namespace). Used by tests to reach node-local ports.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{name}")).with_context(|| format!("open netns {name}"))?;
    std::thread::spawn(move || -> std::io::Result<T> {
        // SAFETY: setns on this thread only; the thread ends after `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
    .with_context(|| format!("enter netns {name}"))
}

/// Minimal HTTP/1.1 GET over a socket made inside a network namespace.
pub fn http_get_in(netns: &str, addr: &str, path: &str) -> Result<String> {
    let addr = addr.to_string();
    let path = path.to_string();
    in_netns(netns, move || -> Result<String> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&addr).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        })
    })?
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
