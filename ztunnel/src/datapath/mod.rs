//! The kernel side of ztunnel: loads the embedded eBPF object once and splits it into the parts
//! that different tasks own, so that none of them needs a lock on the hot path:
//!
//! - [`Capture`]: programs and pod maps; attach/detach per enrolled pod (enrollment API).
//! - [`PolicyMaps`]: identities and policy cells in two banks, one switch per reload.
//! - [`OrigDstTable`]: read by the outbound proxy for every accepted connection.
//! - the `EVENTS` ring buffer, drained by the flow task.
//!
//! Everything is pinned under the pin directory ([`pins`]): maps and links outlive the
//! process, so the kernel keeps enforcing the last policy while ztunnel is down (killed,
//! crashed, upgraded), and a new ztunnel adopts them. See ARCHITECTURE.md ("Lifecycle").
mod capture;
pub mod pins;
mod policy_banks;
mod policy_maps;

pub use capture::{Capture, PodCapture};
pub use policy_maps::{ApplyStats, PolicyMaps, RetireSwitch};
use std::net::{IpAddr, SocketAddr};

use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf, SockMap};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use palisade_ebpf_common::*;

use pins::Pins;

/// The kernel programs, built by build.rs. Empty when built under clippy.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-ebpf.o"));

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
    #[error("pod has no address")]
    NoAddress,
    #[error("a pod has at most {0} addresses")]
    TooManyAddresses(u32),
    #[error("address {ip} belongs to enrolled pod {owner}: an address is owned by exactly one pod")]
    AddressInUse { ip: IpAddr, owner: String },
    #[error("this network namespace is enrolled already, as pod {owner}")]
    NetnsInUse { owner: String },
}

pub(crate) fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Map { what, source }
}

pub(crate) fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Program { what, source }
}

pub struct Kernel {
    pub capture: Capture,
    pub policy: PolicyMaps,
    pub orig_dst: OrigDstTable,
    pub events: RingBuf<MapData>,
}

impl Kernel {
    /// Loads the programs over the maps pinned under `pins` (created and pinned when absent,
    /// adopted with their content when an earlier ztunnel left them). `require_hbone` is set
    /// when the mesh has a CA: plaintext from a workload's address is then refused.
    pub fn load(pins: Pins, require_hbone: bool) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        // The programs use no CO-RE relocations, so the kernel's BTF (several MiB once parsed)
        // is not needed; aya's loader parses it on creation, so drop it and give the memory
        // back to the system.
        let mut loader = aya::EbpfLoader::new();
        loader.btf(None);
        let paths: Vec<(&str, std::path::PathBuf)> = MAP_NAMES.iter().map(|n| (*n, pins.map(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
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
        let policy = PolicyMaps::adopt(
            Array::try_from(take("CONFIG")?).map_err(map_err("CONFIG"))?,
            LpmTrie::try_from(take("IDENTITIES")?).map_err(map_err("IDENTITIES"))?,
            HashMap::try_from(take("POLICY")?).map_err(map_err("POLICY"))?,
            if require_hbone { CONFIG_REQUIRE_HBONE } else { 0 },
        );
        let orig_dst = OrigDstTable(HashMap::try_from(take("ORIG_DST")?).map_err(map_err("ORIG_DST"))?);
        let events = RingBuf::try_from(take("EVENTS")?).map_err(map_err("EVENTS"))?;
        let pods = HashMap::try_from(take("PODS")?).map_err(map_err("PODS"))?;
        let inbound_addrs = HashMap::try_from(take("INBOUND_ADDRS")?).map_err(map_err("INBOUND_ADDRS"))?;
        let inbound_sockets = SockMap::try_from(take("INBOUND_SOCKETS")?).map_err(map_err("INBOUND_SOCKETS"))?;
        Ok(Kernel { capture: Capture::new(ebpf, pins, pods, inbound_addrs, inbound_sockets), policy, orig_dst, events })
    }
}

/// Every map of the object; each is pinned by name under the pin directory.
const MAP_NAMES: [&str; 9] = [
    "CONFIG",
    "IDENTITIES",
    "POLICY",
    "PODS",
    "INBOUND_ADDRS",
    "INBOUND_SOCKETS",
    "ORIG_BY_COOKIE",
    "ORIG_DST",
    "EVENTS",
];

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| KernelError::Io {
        what: format!("program {name}"),
        source: std::io::Error::other("missing from the eBPF object"),
    })?;
    p.try_into().map_err(prog_err(format!("program {name}")))
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
