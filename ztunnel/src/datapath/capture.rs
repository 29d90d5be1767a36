//! Capturing pods: the per-pod map entries and the four attachments (connect4, connect6 and
//! sock_ops on the pod's cgroup, sk_lookup on its network namespace), pinned under the pod's
//! directory so they outlive ztunnel (see [`super::pins`]).
//!
//! Ownership rules that keep enforcement from silently switching off:
//! - an address belongs to exactly one enrolled pod: a second pod claiming it is refused, and
//!   removing a pod deletes only the entries that still point at its own slot;
//! - the sk_lookup program refuses an address without an entry (it runs only in enrolled
//!   namespaces), so a missing entry never means "allow";
//! - a pod enrolled again (same uid, e.g. by a restarted ztunnel) keeps its pinned links: they
//!   are moved to this process's programs in place, never detached and re-attached.
use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockMap};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use palisade_ebpf_common::*;

use super::pins::{self, Pins};
use super::{KernelError, map_err, prog_err, program};
use crate::netns::Netns;

/// Link-based cgroup attachments (bpf_link_create) always coexist with other programs in the
/// same cgroup; the kernel rejects the legacy ALLOW_MULTI flag on them, so pass no flag.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The pinned attachments of a pod: (file name under the pod's pin directory, program).
const ATTACHMENTS: [(&str, &str); 4] =
    [("connect4", "pl_connect4"), ("connect6", "pl_connect6"), ("sockops", "pl_sockops"), ("inbound", "pl_inbound")];

/// What ztunnel needs to capture one pod.
pub struct PodCapture<'a> {
    pub uid: &'a str,
    pub netns: &'a Netns,
    pub cgroup: &'a Path,
    pub addrs: &'a [IpAddr],
    /// ztunnel's inbound listener inside the pod (target of sk_lookup).
    pub inbound_listener: BorrowedFd<'a>,
    /// The slot the pod had before a restart, if any.
    pub slot: Option<u32>,
}

struct Attached {
    uid: String,
    slot: u32,
}

/// Programs and per-pod maps.
pub struct Capture {
    pub(super) ebpf: Ebpf,
    pub(super) pins: Pins,
    pub(super) pods: HashMap<MapData, u64, PodValue>,
    pub(super) inbound_addrs: HashMap<MapData, Addr, u32>,
    pub(super) inbound_sockets: SockMap<MapData>,
    /// By netns cookie.
    attached: StdHashMap<u64, Attached>,
    /// Slots that no pod uses, not even one enforced by pins of an earlier ztunnel.
    free_slots: BTreeSet<u32>,
}

impl Capture {
    pub(super) fn new(
        ebpf: Ebpf,
        pins: Pins,
        pods: HashMap<MapData, u64, PodValue>,
        inbound_addrs: HashMap<MapData, Addr, u32>,
        inbound_sockets: SockMap<MapData>,
    ) -> Self {
        // Pinned pods of an earlier ztunnel keep their slots until they are enrolled again
        // (same slot) or released.
        let used: BTreeSet<u32> = pods.iter().flatten().map(|(_, v)| v.index).collect();
        let free_slots = (0..MAX_PODS).filter(|s| !used.contains(s)).collect();
        Capture { ebpf, pins, pods, inbound_addrs, inbound_sockets, attached: StdHashMap::new(), free_slots }
    }

    /// Starts (or, for a pod pinned by an earlier ztunnel, resumes) capturing a pod; returns
    /// its slot. A new pod's maps are filled before its programs are attached, so the first
    /// captured connection already finds its listener; on error nothing of it stays behind.
    /// A resumed pod's links are moved to this process's programs in place; on error they
    /// stay as they were (enforcing), never detached.
    pub fn attach(&mut self, pod: PodCapture<'_>) -> Result<u32, KernelError> {
        let cookie = pod.netns.cookie();
        if let Some(other) = self.attached.get(&cookie).filter(|a| a.uid != pod.uid) {
            return Err(KernelError::NetnsInUse { owner: other.uid.clone() });
        }
        let addrs: Vec<Addr> = pod.addrs.iter().map(|a| addr_from_ip(*a)).collect();
        let primary = *addrs.first().ok_or(KernelError::NoAddress)?;
        if addrs.len() > MAX_ADDRS_PER_POD as usize {
            return Err(KernelError::TooManyAddresses(MAX_ADDRS_PER_POD));
        }
        let slot = self.choose_slot(cookie, pod.slot)?;
        for (a, ip) in addrs.iter().zip(pod.addrs) {
            if let Ok(owner) = self.inbound_addrs.get(a, 0)
                && owner != slot
                && let Some(other) = self.attached.values().find(|x| x.slot == owner).map(|x| x.uid.clone())
            {
                self.free_slots_return(cookie, slot);
                return Err(KernelError::AddressInUse { ip: *ip, owner: other });
            }
        }
        let dir = self.pins.pod_dir(pod.uid);
        let resumed = dir.exists();
        let result = self
            .write_maps(cookie, slot, primary, &addrs, pod.inbound_listener)
            .and_then(|()| if resumed { self.adopt_links(&dir, &pod) } else { self.attach_links(&dir, &pod) });
        match result {
            Ok(()) => {
                self.attached.insert(cookie, Attached { uid: pod.uid.to_string(), slot });
                Ok(slot)
            }
            Err(e) if resumed => Err(e),
            Err(e) => {
                self.release(slot, &dir);
                Err(e)
            }
        }
    }

    fn choose_slot(&mut self, cookie: u64, wanted: Option<u32>) -> Result<u32, KernelError> {
        if let Some(a) = self.attached.get(&cookie) {
            return Ok(a.slot);
        }
        // A restored pod keeps its slot: its pinned addresses already point there.
        if let Some(s) = wanted
            && s < MAX_PODS
            && (self.free_slots.remove(&s) || self.pods.get(&cookie, 0).is_ok_and(|v| v.index == s))
        {
            return Ok(s);
        }
        self.free_slots.pop_first().ok_or(KernelError::Full(MAX_PODS))
    }

    /// Gives back a slot taken by a failed attach of a pod that was not attached before.
    fn free_slots_return(&mut self, cookie: u64, slot: u32) {
        if !self.attached.contains_key(&cookie) {
            self.free_slots.insert(slot);
        }
    }

    fn write_maps(
        &mut self,
        cookie: u64,
        slot: u32,
        primary: Addr,
        addrs: &[Addr],
        listener: BorrowedFd<'_>,
    ) -> Result<(), KernelError> {
        self.inbound_sockets.set(slot, &listener, 0).map_err(map_err("INBOUND_SOCKETS"))?;
        // Addresses the pod no longer has.
        let stale: Vec<Addr> = self
            .inbound_addrs
            .iter()
            .flatten()
            .filter(|(a, s)| *s == slot && !addrs.contains(a))
            .map(|(a, _)| a)
            .collect();
        for a in &stale {
            let _ = self.inbound_addrs.remove(a);
        }
        for a in addrs {
            self.inbound_addrs.insert(a, slot, 0).map_err(map_err("INBOUND_ADDRS"))?;
        }
        self.pods.insert(cookie, PodValue { addr: primary, index: slot, _pad: 0 }, 0).map_err(map_err("PODS"))
    }

    fn attach_links(&mut self, dir: &Path, pod: &PodCapture<'_>) -> Result<(), KernelError> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let cgroup = File::open(pod.cgroup).map_err(io_err(format!("open cgroup {}", pod.cgroup.display())))?;
        for (file, name) in ATTACHMENTS {
            let link = self.new_link(name, &cgroup, pod.netns)?;
            link.pin(dir.join(file)).map_err(|e| KernelError::Io {
                what: format!("pin {}", dir.join(file).display()),
                source: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }

    fn new_link(&mut self, name: &str, cgroup: &File, netns: &Netns) -> Result<FdLink, KernelError> {
        let what = format!("attach {name}");
        let invalid = |what: String| {
            move |e: aya::programs::links::LinkError| KernelError::Io { what, source: std::io::Error::other(e) }
        };
        Ok(match name {
            "pl_sockops" => {
                let p: &mut SockOps = program(&mut self.ebpf, name)?;
                let id = p.attach(cgroup, LINK_MODE).map_err(prog_err(&what))?;
                FdLink::try_from(p.take_link(id).map_err(prog_err(&what))?).map_err(invalid(what))?
            }
            "pl_inbound" => {
                let p: &mut SkLookup = program(&mut self.ebpf, name)?;
                let id = p.attach(netns).map_err(prog_err(&what))?;
                p.take_link(id).map_err(prog_err(&what))?.into()
            }
            _ => {
                let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                let id = p.attach(cgroup, LINK_MODE).map_err(prog_err(&what))?;
                FdLink::try_from(p.take_link(id).map_err(prog_err(&what))?).map_err(invalid(what))?
            }
        })
    }

    /// Moves a resumed pod's pinned links to this process's programs (an atomic swap per
    /// link); an attachment whose pin is missing is made anew.
    fn adopt_links(&mut self, dir: &Path, pod: &PodCapture<'_>) -> Result<(), KernelError> {
        for (file, name) in ATTACHMENTS {
            let path = dir.join(file);
            if !path.exists() {
                let cgroup = File::open(pod.cgroup).map_err(io_err(format!("open cgroup {}", pod.cgroup.display())))?;
                let link = self.new_link(name, &cgroup, pod.netns)?;
                link.pin(&path).map_err(|e| KernelError::Io {
                    what: format!("pin {}", path.display()),
                    source: std::io::Error::other(e),
                })?;
                continue;
            }
            let link = pins::obj_get(&path).map_err(io_err(format!("open pinned link {}", path.display())))?;
            let fd = self.program_fd(name)?;
            pins::link_update(link.as_fd(), fd.as_fd())
                .map_err(io_err(format!("move {} to this ztunnel's {name}", path.display())))?;
        }
        Ok(())
    }

    fn program_fd(&mut self, name: &str) -> Result<aya::programs::ProgramFd, KernelError> {
        let p = self.ebpf.program(name).ok_or_else(|| KernelError::Io {
            what: format!("program {name}"),
            source: std::io::Error::other("missing from the eBPF object"),
        })?;
        p.fd().and_then(|fd| fd.try_clone().map_err(Into::into)).map_err(prog_err(format!("fd of {name}")))
    }

    /// Stops capturing the pod with this netns cookie: its links are unpinned (detached),
    /// then its map entries removed.
    pub fn detach(&mut self, cookie: u64) {
        if let Some(att) = self.attached.remove(&cookie) {
            let dir = self.pins.pod_dir(&att.uid);
            self.release(att.slot, &dir);
        }
    }

    /// Releases a pod that is not attached in this process (its namespace is gone): its pins
    /// and whatever map entries point at `slot`.
    pub fn release_pinned(&mut self, uid: &str, slot: Option<u32>) {
        let dir = self.pins.pod_dir(uid);
        match slot {
            Some(s) if !self.attached.values().any(|a| a.slot == s) => self.release(s, &dir),
            _ => pins::remove_dir(&dir),
        }
    }

    /// Detaches first (no new captures), then clears the maps. Best effort: every step runs
    /// even when an earlier one failed.
    fn release(&mut self, slot: u32, dir: &Path) {
        pins::remove_dir(dir);
        let cookies: Vec<u64> = self.pods.iter().flatten().filter(|(_, v)| v.index == slot).map(|(c, _)| c).collect();
        for c in cookies {
            let _ = self.pods.remove(&c);
        }
        let addrs: Vec<Addr> =
            self.inbound_addrs.iter().flatten().filter(|(_, s)| *s == slot).map(|(a, _)| a).collect();
        for a in addrs {
            let _ = self.inbound_addrs.remove(&a);
        }
        let _ = self.inbound_sockets.clear_index(&slot);
        self.free_slots.insert(slot);
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// Pin directories of pods that no enrollment of this process covers.
    pub fn unclaimed_pins(&self) -> Vec<PathBuf> {
        let claimed: Vec<PathBuf> = self.attached.values().map(|a| self.pins.pod_dir(&a.uid)).collect();
        self.pins.pinned_pods().into_iter().filter(|d| !claimed.contains(d)).collect()
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> KernelError {
    move |source| KernelError::Io { what, source }
}
