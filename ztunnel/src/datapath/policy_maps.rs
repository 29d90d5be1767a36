//! Identities and policy cells in two banks (see ARCHITECTURE.md, "Data path" and
//! "Lifecycle"). Every entry of `IDENTITIES` and `POLICY` is keyed by a bank, the low bit of
//! a generation number ([`bank`]); `CONFIG.generation` names the generation in force, and
//! programs read it once per verdict and then only its bank's entries.
//!
//! The bank in force holds generation N; the other bank holds N-1. To put N+1 in force,
//! ztunnel brings the other bank from N-1 to N+1 by writing their difference (it keeps both
//! banks' contents in user space, [`Image`], to diff against), then writes `CONFIG` once:
//! every program that starts after it reads N+1, every one that started before reads N,
//! whose bank nothing touches; no verdict sees a mix of two policies. Nothing is deleted
//! after a switch: bank N becomes the next one to write, one generation behind. A switch
//! costs the difference between N-1 and N+1, not the policy's size.
//!
//! Grace: a program that read `CONFIG` just before a switch may still be looking up the bank
//! it names, which is about to become the bank written next. So the write of a bank starts
//! [`GENERATION_GRACE`] after the last switch at the earliest. Programs run for microseconds
//! inside an RCU read-side section (a verdict reads `CONFIG` once, then looks up a few
//! entries); the grace is three orders of magnitude more. The grace delays the next write
//! only, never the switch or its ACK.
//!
//! Not knowing a bank (after a start over pinned maps, or a write that failed half-way), this
//! process reads it back from the kernel before its next write. The bank in force is never
//! written: on error it stays in force, untouched, and the error goes to the caller (NACK).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use palisade_ebpf_common::*;
use palisade_model::Snapshot;

use super::policy_banks::{self, Image, Pending};
use super::{KernelError, map_err};

/// Time given to programs that read the generation before the last switch to finish their
/// lookups in its bank, before that bank is written again (see the module documentation).
const GENERATION_GRACE: Duration = Duration::from_millis(20);

/// Stops a [`PolicyMaps`] from writing, once any write in progress has finished.
#[derive(Clone)]
pub struct RetireSwitch(Arc<Mutex<bool>>);

impl RetireSwitch {
    pub fn retire(&self) {
        *self.0.lock().expect("retire lock") = true;
    }
}

/// Counts of one switch.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ApplyStats {
    pub generation: u32,
    /// Entries of the generation now in force.
    pub identities: usize,
    pub cells: usize,
    /// Entries inserted or updated, and deleted, in the bank switched to.
    pub written: usize,
    pub deleted: usize,
    /// Whether the bank was read back from the kernel first (after a start or a failed write).
    pub read_back: bool,
    /// Waiting for the grace after the previous switch (part of `elapsed_ms`).
    pub grace_wait_ms: f64,
    /// Writing the maps and switching generation.
    pub elapsed_ms: f64,
    /// Reading, validating and compiling the resources (set by the caller).
    pub compile_ms: f64,
}

/// Identities and policy cells, in two banks.
pub struct PolicyMaps {
    config: Array<MapData, Config>,
    identities: LpmTrie<MapData, IpKey, IdentityValue>,
    cells: HashMap<MapData, PolicyKey, PolicyValue>,
    /// The generation in force.
    generation: u32,
    /// `CONFIG_*` flags written with every generation switch.
    flags: u32,
    /// What each bank holds; `None` when this process does not know (read back before writing).
    banks: [Option<Image>; 2],
    /// Per bank, what may have moved since it was last written, from the compiler's change
    /// sets (`None`: unknown, diff everything).
    pending: [Option<Pending>; 2],
    /// When this process last switched; `None` before its first switch (a predecessor may have
    /// switched a moment ago).
    last_switch: Option<Instant>,
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
            banks: [None, None],
            pending: [None, None],
            last_switch: None,
            retired: Arc::default(),
        }
    }

    /// A switch that stops this process from writing the maps (after a hand-over); snapshots
    /// are still compiled and published, so the connections it still carries are re-checked.
    pub fn retire_switch(&self) -> RetireSwitch {
        RetireSwitch(self.retired.clone())
    }

    /// Makes `snapshot` the policy in force: the bank not in force is brought to it (the
    /// difference from what it holds), then one write to `CONFIG` switches every program to
    /// it. Returns once switched. On error the bank in force stays in force, untouched, and
    /// the other bank is read back before the next write.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Result<ApplyStats, KernelError> {
        let start = Instant::now();
        let retired = self.retired.clone();
        let retired = retired.lock().expect("retire lock");
        if *retired {
            return Ok(ApplyStats { generation: self.generation, ..Default::default() });
        }
        if self.last_switch.is_none() {
            // The first write after start-up: continue from the generation in force now (a
            // predecessor may have switched since the maps were opened).
            self.generation = self.config.get(&0, 0).map(|c| c.generation).map_err(map_err("CONFIG"))?;
        }
        let generation = self.generation.wrapping_add(1);
        let bank = bank(generation);
        let grace_wait = match self.last_switch {
            Some(at) => GENERATION_GRACE.saturating_sub(at.elapsed()),
            None => GENERATION_GRACE,
        };
        std::thread::sleep(grace_wait);

        // Unknown while being written: a failure leaves it to be read back.
        let (mut image, read_back) = match self.banks[bank as usize].take() {
            Some(image) => (image, false),
            None => (policy_banks::read_back(&mut self.identities, &mut self.cells, bank)?, true),
        };
        // What moved since this bank was written: its own pending set and this snapshot's
        // change set; without both (file mode, a start, a failure), everything is compared.
        let b = bank as usize;
        let moved = match (self.pending[b].take().filter(|_| !read_back), snapshot.changed.as_deref()) {
            (Some(pending), Some(changed)) => Some(pending.and(changed)),
            _ => None,
        };
        let changes = match &moved {
            Some(moved) => image.changes_in(moved, snapshot),
            None => image.changes_to(&policy_banks::identities_of(snapshot), &snapshot.cells),
        };
        policy_banks::write(&mut self.identities, &mut self.cells, bank, &changes)?;
        image.apply(&changes);
        self.banks[b] = Some(image);
        self.pending[b] = Some(Pending::default());
        self.pending[1 - b] = match (self.pending[1 - b].take(), snapshot.changed.as_deref()) {
            (Some(pending), Some(changed)) => Some(pending.and(changed)),
            _ => None,
        };
        // The switch. Should it fail, the bank written stays as the image says, not in force.
        self.config.set(0, Config { generation, flags: self.flags }, 0).map_err(map_err("CONFIG"))?;
        self.last_switch = Some(Instant::now());
        self.generation = generation;
        Ok(ApplyStats {
            generation,
            identities: image_len(&self.banks[b]),
            cells: snapshot.cells.len(),
            written: changes.written(),
            deleted: changes.deleted(),
            read_back,
            grace_wait_ms: grace_wait.as_secs_f64() * 1e3,
            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
            compile_ms: 0.0,
        })
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }
}

fn image_len(image: &Option<Image>) -> usize {
    image.as_ref().map_or(0, |i| i.ids.len())
}
