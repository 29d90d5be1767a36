//! Where the kernel side lives on bpffs, so that it outlives ztunnel.
//!
//! ```text
//! <pin dir>/maps-v<MAPS_LAYOUT>/<MAP>        every map (policy, pods, original destinations, events)
//! <pin dir>/pods/<pod key>/<attachment>      the bpf_links of one enrolled pod
//! ```
//! A pinned link stays attached after the process that made it exits (even on SIGKILL), and
//! the programs it holds keep reading the pinned maps: the last policy stays enforced while
//! ztunnel is down. A restarted ztunnel adopts the maps (aya reuses a pinned map of the same
//! name) and moves every pinned link to its own, possibly newer, programs with
//! `BPF_LINK_UPDATE`, an atomic swap: there is no moment without a program.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use palisade_ebpf_common::MAPS_LAYOUT;

/// Where bpffs is mounted on a standard host.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of one ztunnel.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    /// Makes sure `root` is on a bpffs (mounting one at /sys/fs/bpf when none is there) and
    /// creates the directories.
    pub fn prepare(root: &Path) -> io::Result<Pins> {
        ensure_bpffs(root)?;
        let pins = Pins { root: root.to_path_buf() };
        std::fs::create_dir_all(pins.maps_dir())?;
        std::fs::create_dir_all(pins.pods_dir())?;
        Ok(pins)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAPS_LAYOUT}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// The directory of a pod's links: named after its uid, reduced to characters that are
    /// safe in a path (a uid that needs escaping is hex-encoded whole, so two uids never meet).
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        let plain = !uid.is_empty()
            && uid.len() <= 200
            && !uid.starts_with('.')
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        let name = if plain { uid.to_string() } else { uid.bytes().map(|b| format!("{b:02x}")).collect::<String>() };
        self.pods_dir().join(name)
    }

    /// Pod directories present on bpffs (pods enforced now, by this or an earlier ztunnel).
    pub fn pinned_pods(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.pods_dir()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs with a valid NUL-terminated path and an out struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The nearest existing ancestor of `path` must be on bpffs; if it is not and `path` is under
/// /sys/fs/bpf, a bpffs is mounted there (hosts without systemd, and this test machine, have
/// none; Kubernetes nodes usually do).
fn ensure_bpffs(path: &Path) -> io::Result<()> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if !path.starts_with(BPFFS) {
        return Err(io::Error::other(format!(
            "pin directory {} is not on a bpffs (mount one: mount -t bpf bpf {BPFFS})",
            path.display()
        )));
    }
    std::fs::create_dir_all(BPFFS)?;
    let (source, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Another ztunnel may have mounted it a moment ago.
        if !is_bpffs(Path::new(BPFFS))? {
            return Err(io::Error::new(e.kind(), format!("mount bpffs at {BPFFS}: {e}")));
        }
    }
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

/// `BPF_LINK_UPDATE`: atomically replaces the program of an attached link.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    /// The `link_update` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) with a valid attr of the size we pass; the kernel zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    /// The `obj_pin`/`obj_get` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: bpf(2) with a valid attr; the path outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr as *const ObjAttr, std::mem::size_of::<ObjAttr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Removes a directory of pins (links detach once nothing holds them).
pub fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove pins");
    }
}
