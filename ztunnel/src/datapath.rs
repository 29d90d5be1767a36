//! The kernel side of ztunnel: loads the embedded eBPF object once and splits it into the parts
//! that different tasks own, so that none of them needs a lock on the hot path:
//!
//! - [`Capture`]: programs and pod maps; attach/detach per enrolled pod (enrollment API).
//! - [`PolicyMaps`]: identities and policy cells, written a generation at a time (reloads).
//! - [`OrigDstTable`]: read by the outbound proxy for every accepted connection.
//! - the `EVENTS` ring buffer, drained by the flow task.
//!
//! Nothing is pinned: every program is attached through a bpf_link owned by this process, so
//! the kernel detaches everything when ztunnel exits, even on SIGKILL, and a restarted ztunnel
//! starts from a clean slate. The price is that pods are not captured while ztunnel is down;
//! see ARCHITECTURE.md ("Lifecycle").
use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf, SockMap};
use aya::programs::links::CgroupAttachMode;
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use palisade_ebpf_common::*;
use palisade_policy::{Action, Snapshot};

use crate::netns::Netns;

/// The kernel programs, built by build.rs. Empty when built under clippy.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-ebpf.o"));

/// Time given to programs that read the old generation number to finish their lookups before
/// the old generation's entries are deleted. Programs run for microseconds inside an RCU
/// read-side section; this is three orders of magnitude more.
const GENERATION_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this ztunnel binary was built without its kernel programs (clippy or PALISADE_EBPF_STUB build)")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free capture slot: {0} pods are enrolled already")]
    Full(u32),
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Map { what, source }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Program { what, source }
}

/// Link-based cgroup attachments (bpf_link_create) always coexist with other programs in the
/// same cgroup; the kernel rejects the legacy ALLOW_MULTI flag on them, so pass no flag.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Must match `MAX_PODS` in the kernel programs.
const MAX_PODS: u32 = 1_024;

pub struct Kernel {
    pub capture: Capture,
    pub policy: PolicyMaps,
    pub orig_dst: OrigDstTable,
    pub events: RingBuf<MapData>,
}

impl Kernel {
    pub fn load() -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        // The programs use no CO-RE relocations, so the kernel's BTF (several MiB once parsed)
        // is not needed; aya's loader parses it on creation, so drop it and give the memory
        // back to the system.
        let mut ebpf = aya::EbpfLoader::new().btf(None).load(OBJECT)?;
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
        for name in ["pl_connect4", "pl_connect6"] {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load().map_err(prog_err(format!("verifying {name}")))?;
        }
        let p: &mut SockOps = program(&mut ebpf, "pl_sockops")?;
        p.load().map_err(prog_err("verifying pl_sockops"))?;
        let p: &mut SkLookup = program(&mut ebpf, "pl_inbound")?;
        p.load().map_err(prog_err("verifying pl_inbound"))?;

        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| KernelError::Io {
                what: format!("map {name}"),
                source: std::io::Error::other("missing from the eBPF object"),
            })
        };
        let policy = PolicyMaps {
            config: Array::try_from(take("CONFIG")?).map_err(map_err("CONFIG"))?,
            identities: LpmTrie::try_from(take("IDENTITIES")?).map_err(map_err("IDENTITIES"))?,
            cells: HashMap::try_from(take("POLICY")?).map_err(map_err("POLICY"))?,
            generation: 0,
            applied_ids: Vec::new(),
            applied_cells: Vec::new(),
        };
        let orig_dst = OrigDstTable(HashMap::try_from(take("ORIG_DST")?).map_err(map_err("ORIG_DST"))?);
        let events = RingBuf::try_from(take("EVENTS")?).map_err(map_err("EVENTS"))?;
        let pods = HashMap::try_from(take("PODS")?).map_err(map_err("PODS"))?;
        let inbound_addrs = HashMap::try_from(take("INBOUND_ADDRS")?).map_err(map_err("INBOUND_ADDRS"))?;
        let inbound_sockets = SockMap::try_from(take("INBOUND_SOCKETS")?).map_err(map_err("INBOUND_SOCKETS"))?;
        Ok(Kernel {
            capture: Capture {
                ebpf,
                pods,
                inbound_addrs,
                inbound_sockets,
                attached: StdHashMap::new(),
                free_slots: (0..MAX_PODS).rev().collect(),
            },
            policy,
            orig_dst,
            events,
        })
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| KernelError::Io {
        what: format!("program {name}"),
        source: std::io::Error::other("missing from the eBPF object"),
    })?;
    p.try_into().map_err(prog_err(format!("program {name}")))
}

/// What ztunnel needs to capture one pod.
pub struct PodCapture<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Path,
    pub addrs: &'a [IpAddr],
    /// ztunnel's inbound listener inside the pod (target of sk_lookup).
    pub inbound_listener: &'a tokio::net::TcpListener,
}

struct Attached {
    slot: u32,
    addrs: Vec<Addr>,
    connect4: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    connect6: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    sockops: Option<aya::programs::sock_ops::SockOpsLinkId>,
    inbound: Option<aya::programs::sk_lookup::SkLookupLinkId>,
}

/// Programs and per-pod maps.
pub struct Capture {
    ebpf: Ebpf,
    pods: HashMap<MapData, u64, PodValue>,
    inbound_addrs: HashMap<MapData, Addr, u32>,
    inbound_sockets: SockMap<MapData>,
    /// By netns cookie.
    attached: StdHashMap<u64, Attached>,
    free_slots: Vec<u32>,
}

impl Capture {
    /// Starts capturing a pod. Maps are filled before programs are attached, so the first
    /// captured connection already finds its listener; on error nothing stays behind.
    pub fn attach(&mut self, pod: PodCapture<'_>) -> Result<(), KernelError> {
        let cookie = pod.netns.cookie();
        if self.attached.contains_key(&cookie) {
            self.detach(cookie)?;
        }
        let slot = self.free_slots.pop().ok_or(KernelError::Full(MAX_PODS))?;
        let addrs: Vec<Addr> = pod.addrs.iter().map(|a| addr_from_ip(*a)).collect();
        let mut partial =
            Attached { slot, addrs: Vec::new(), connect4: None, connect6: None, sockops: None, inbound: None };
        let result = self.attach_inner(&pod, cookie, &addrs, &mut partial);
        match result {
            Ok(()) => {
                self.attached.insert(cookie, partial);
                Ok(())
            }
            Err(e) => {
                self.undo(cookie, partial);
                Err(e)
            }
        }
    }

    fn attach_inner(
        &mut self,
        pod: &PodCapture<'_>,
        cookie: u64,
        addrs: &[Addr],
        att: &mut Attached,
    ) -> Result<(), KernelError> {
        let primary = *addrs.first().ok_or_else(|| KernelError::Io {
            what: "enroll".into(),
            source: std::io::Error::other("pod has no address"),
        })?;
        self.inbound_sockets.set(att.slot, &pod.inbound_listener.as_raw_fd(), 0).map_err(map_err("INBOUND_SOCKETS"))?;
        for a in addrs {
            self.inbound_addrs.insert(a, att.slot, 0).map_err(map_err("INBOUND_ADDRS"))?;
            att.addrs.push(*a);
        }
        self.pods.insert(cookie, PodValue { addr: primary, index: att.slot, _pad: 0 }, 0).map_err(map_err("PODS"))?;
        let cgroup = File::open(pod.cgroup)
            .map_err(|source| KernelError::Io { what: format!("open cgroup {}", pod.cgroup.display()), source })?;
        let p: &mut CgroupSockAddr = program(&mut self.ebpf, "pl_connect4")?;
        att.connect4 = Some(p.attach(&cgroup, LINK_MODE).map_err(prog_err("attach connect4"))?);
        let p: &mut CgroupSockAddr = program(&mut self.ebpf, "pl_connect6")?;
        att.connect6 = Some(p.attach(&cgroup, LINK_MODE).map_err(prog_err("attach connect6"))?);
        let p: &mut SockOps = program(&mut self.ebpf, "pl_sockops")?;
        att.sockops = Some(p.attach(&cgroup, LINK_MODE).map_err(prog_err("attach sockops"))?);
        let p: &mut SkLookup = program(&mut self.ebpf, "pl_inbound")?;
        att.inbound = Some(p.attach(pod.netns).map_err(prog_err("attach sk_lookup"))?);
        Ok(())
    }

    /// Stops capturing the pod with this netns cookie.
    pub fn detach(&mut self, cookie: u64) -> Result<(), KernelError> {
        if let Some(att) = self.attached.remove(&cookie) {
            self.undo(cookie, att);
        }
        Ok(())
    }

    /// Detaches programs first (no new captures), then clears the maps. Best effort: every
    /// step runs even when an earlier one failed.
    fn undo(&mut self, cookie: u64, att: Attached) {
        let Attached { slot, addrs, connect4, connect6, sockops, inbound } = att;
        for (name, id) in [("pl_connect4", connect4), ("pl_connect6", connect6)] {
            if let (Some(id), Ok(p)) = (id, program::<CgroupSockAddr>(&mut self.ebpf, name)) {
                let _ = p.detach(id);
            }
        }
        if let (Some(id), Ok(p)) = (sockops, program::<SockOps>(&mut self.ebpf, "pl_sockops")) {
            let _ = p.detach(id);
        }
        if let (Some(id), Ok(p)) = (inbound, program::<SkLookup>(&mut self.ebpf, "pl_inbound")) {
            let _ = p.detach(id);
        }
        let _ = self.pods.remove(&cookie);
        for a in &addrs {
            let _ = self.inbound_addrs.remove(a);
        }
        let _ = self.inbound_sockets.clear_index(&slot);
        self.free_slots.push(slot);
    }

    /// Detaches every pod (shutdown).
    pub fn detach_all(&mut self) {
        let cookies: Vec<u64> = self.attached.keys().copied().collect();
        for c in cookies {
            let _ = self.detach(c);
        }
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }
}

/// Original destinations of captured connections, keyed by (pod netns, client port).
pub struct OrigDstTable(HashMap<MapData, SockKey, OrigDst>);

impl OrigDstTable {
    pub fn get(&self, netns_cookie: u64, client_port: u16) -> Option<OrigDst> {
        self.0.get(&SockKey { netns_cookie, port: client_port.into(), _pad: 0 }, 0).ok()
    }
}

/// The original destination as a socket address.
pub fn orig_dst_addr(o: &OrigDst) -> SocketAddr {
    SocketAddr::new(ip_from_addr(o.addr), o.port)
}

/// Counts of one generation write.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ApplyStats {
    pub generation: u32,
    pub identities: usize,
    pub cells: usize,
    /// Writing the maps and switching generation.
    pub elapsed_ms: f64,
    /// Reading, validating and compiling the resources (set by the caller).
    pub compile_ms: f64,
}

/// Identities and policy cells, written a whole generation at a time.
pub struct PolicyMaps {
    config: Array<MapData, Config>,
    identities: LpmTrie<MapData, IpKey, IdentityValue>,
    cells: HashMap<MapData, PolicyKey, PolicyValue>,
    generation: u32,
    applied_ids: Vec<Key<IpKey>>,
    applied_cells: Vec<PolicyKey>,
}

impl PolicyMaps {
    /// Makes `snapshot` the policy in force. The new generation is written beside the old one,
    /// then one write to `CONFIG` switches every program to it; the old generation is
    /// removed after a grace period. On error the new entries are removed and the old
    /// generation stays in force, untouched.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Result<ApplyStats, KernelError> {
        let start = Instant::now();
        let generation = self.generation.wrapping_add(1);
        let mut ids = Vec::with_capacity(snapshot.addresses.len());
        let mut cells = Vec::with_capacity(snapshot.cells.len());
        let written = self.write_generation(snapshot, generation, &mut ids, &mut cells);
        if let Err(e) = written {
            self.remove(&ids, &cells);
            return Err(e);
        }
        if let Err(source) = self.config.set(0, Config { generation, _pad: 0 }, 0) {
            self.remove(&ids, &cells);
            return Err(map_err("CONFIG")(source));
        }
        std::thread::sleep(GENERATION_GRACE);
        let old_ids = std::mem::replace(&mut self.applied_ids, ids);
        let old_cells = std::mem::replace(&mut self.applied_cells, cells);
        self.remove(&old_ids, &old_cells);
        self.generation = generation;
        Ok(ApplyStats {
            generation,
            identities: self.applied_ids.len(),
            cells: self.applied_cells.len(),
            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
            compile_ms: 0.0,
        })
    }

    fn write_generation(
        &mut self,
        snapshot: &Snapshot,
        generation: u32,
        ids: &mut Vec<Key<IpKey>>,
        cells: &mut Vec<PolicyKey>,
    ) -> Result<(), KernelError> {
        let workloads = snapshot.addresses.iter().map(|(ip, id)| {
            let default_deny = snapshot.identity(*id).is_some_and(|i| i.default_deny);
            (*ip, 128, *id, if default_deny { IDENTITY_DEFAULT_DENY } else { 0 })
        });
        // Address blocks named by policies: the LPM trie gives an address the most specific.
        let blocks = snapshot.cidrs.iter().map(|c| (c.cidr.addr, c.cidr.mapped_prefix(), c.id, 0));
        for (ip, prefix, identity, flags) in workloads.chain(blocks) {
            let key = Key::new(32 + prefix, IpKey { generation, addr: addr_from_ip(ip) });
            self.identities.insert(&key, IdentityValue { identity, flags }, 0).map_err(map_err("IDENTITIES"))?;
            ids.push(key);
        }
        for (k, c) in &snapshot.cells {
            let key = PolicyKey { generation, src: k.src, dst: k.dst, port: k.port, proto: PROTO_TCP, _pad: 0 };
            let action = match c.action {
                Action::Allow => ACTION_ALLOW,
                Action::Deny => ACTION_DENY,
            };
            self.cells.insert(key, PolicyValue { action, rule: c.rule }, 0).map_err(map_err("POLICY"))?;
            cells.push(key);
        }
        Ok(())
    }

    fn remove(&mut self, ids: &[Key<IpKey>], cells: &[PolicyKey]) {
        for k in ids {
            let _ = self.identities.remove(k);
        }
        for k in cells {
            let _ = self.cells.remove(k);
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }
}
