//! Identities and policy cells, written a whole generation at a time (see ARCHITECTURE.md,
//! "Policy model and its compilation"). The maps are pinned: a ztunnel that starts over maps
//! of an earlier one continues from the generation in force and removes every other
//! generation's entries after its first switch.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData};
use palisade_ebpf_common::*;
use palisade_model::{Action, Snapshot};

use super::{KernelError, map_err};

/// Time given to programs that read the old generation number to finish their lookups before
/// the old generation's entries are deleted. Programs run for microseconds inside an RCU
/// read-side section; this is three orders of magnitude more.
const GENERATION_GRACE: Duration = Duration::from_millis(20);

/// Stops a [`PolicyMaps`] from writing, once any write in progress has finished.
#[derive(Clone)]
pub struct RetireSwitch(Arc<Mutex<bool>>);

impl RetireSwitch {
    pub fn retire(&self) {
        *self.0.lock().expect("retire lock") = true;
    }
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
    /// `CONFIG_*` flags written with every generation switch.
    flags: u32,
    /// The maps held entries of an earlier ztunnel whose keys this one does not know: sweep
    /// every other generation after the first switch.
    sweep: bool,
    applied_ids: Vec<Key<IpKey>>,
    applied_cells: Vec<PolicyKey>,
    /// Set once this process has handed the data path to a successor: from then on the maps
    /// are the successor's to write. Held for the whole of a write, so retiring waits for a
    /// write in progress.
    retired: Arc<Mutex<bool>>,
}

impl PolicyMaps {
    /// Takes over the (possibly pinned, already populated) maps: the generation in force stays
    /// in force until the first [`Self::apply`].
    pub(super) fn adopt(
        config: Array<MapData, Config>,
        identities: LpmTrie<MapData, IpKey, IdentityValue>,
        cells: HashMap<MapData, PolicyKey, PolicyValue>,
        flags: u32,
    ) -> Self {
        let generation = config.get(&0, 0).map(|c| c.generation).unwrap_or(0);
        PolicyMaps {
            config,
            identities,
            cells,
            generation,
            flags,
            sweep: true,
            applied_ids: Vec::new(),
            applied_cells: Vec::new(),
            retired: Arc::default(),
        }
    }

    /// A switch that stops this process from writing the maps (after a hand-over); snapshots
    /// are still compiled and published, so the connections it still carries are re-checked.
    pub fn retire_switch(&self) -> RetireSwitch {
        RetireSwitch(self.retired.clone())
    }

    /// Makes `snapshot` the policy in force. The new generation is written beside the old one,
    /// then one write to `CONFIG` switches every program to it; the old generation is
    /// removed after a grace period. On error the new entries are removed and the old
    /// generation stays in force, untouched.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Result<ApplyStats, KernelError> {
        let start = Instant::now();
        let retired = self.retired.clone();
        let retired = retired.lock().expect("retire lock");
        if *retired {
            return Ok(ApplyStats { generation: self.generation, ..Default::default() });
        }
        if self.sweep {
            // The first write after start-up: continue from the generation in force now (a
            // predecessor may have switched since the maps were opened).
            self.generation = self.config.get(&0, 0).map(|c| c.generation).unwrap_or(self.generation);
        }
        let generation = self.generation.wrapping_add(1);
        let mut ids = Vec::with_capacity(snapshot.addresses.len());
        let mut cells = Vec::with_capacity(snapshot.cells.len());
        let written = self.write_generation(snapshot, generation, &mut ids, &mut cells);
        if let Err(e) = written {
            self.remove(&ids, &cells);
            return Err(e);
        }
        if let Err(source) = self.config.set(0, Config { generation, flags: self.flags }, 0) {
            self.remove(&ids, &cells);
            return Err(map_err("CONFIG")(source));
        }
        std::thread::sleep(GENERATION_GRACE);
        let old_ids = std::mem::replace(&mut self.applied_ids, ids);
        let old_cells = std::mem::replace(&mut self.applied_cells, cells);
        self.remove(&old_ids, &old_cells);
        if std::mem::take(&mut self.sweep) {
            self.sweep_other_generations(generation);
        }
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
            let ident = snapshot.identity(*id);
            let mut flags = IDENTITY_WORKLOAD;
            if ident.is_some_and(|i| i.default_deny) {
                flags |= IDENTITY_DEFAULT_DENY;
            }
            if ident.is_some_and(|i| i.egress_default_deny) {
                flags |= IDENTITY_EGRESS_DEFAULT_DENY;
            }
            (*ip, 128, *id, flags)
        });
        // Address blocks named by policies: the LPM trie gives an address the most specific.
        let blocks = snapshot.cidrs.iter().map(|c| (c.cidr.addr, c.cidr.mapped_prefix(), c.id, 0));
        // Service VIPs: their own identity, egress by their own cells, no ingress default.
        let services = snapshot.services.iter().map(|s| (s.vip, 128, s.id, IDENTITY_SERVICE));
        for (ip, prefix, identity, flags) in workloads.chain(blocks).chain(services) {
            let key = Key::new(32 + prefix, IpKey { generation, addr: addr_from_ip(ip) });
            self.identities.insert(&key, IdentityValue { identity, flags }, 0).map_err(map_err("IDENTITIES"))?;
            ids.push(key);
        }
        for (k, c) in &snapshot.cells {
            let key = PolicyKey {
                generation,
                src: k.src,
                dst: k.dst,
                port: k.port,
                proto: PROTO_TCP,
                direction: k.direction.kernel(),
            };
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

    /// Removes entries of every generation but `keep` (left by an earlier ztunnel).
    fn sweep_other_generations(&mut self, keep: u32) {
        let ids: Vec<Key<IpKey>> = self.identities.keys().flatten().filter(|k| k.data().generation != keep).collect();
        let cells: Vec<PolicyKey> = self.cells.keys().flatten().filter(|k| k.generation != keep).collect();
        self.remove(&ids, &cells);
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }
}
