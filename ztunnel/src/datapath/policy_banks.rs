//! What one bank of `IDENTITIES` and `POLICY` holds, kept in user space, and the difference
//! between two banks' contents: the writes that bring the bank not in force from the
//! generation before the one in force to the next one (see [`super::PolicyMaps`]).
//!
//! An image is exact: it is built from what was written (or read back from the kernel when
//! this process does not know, after a start or a failed write), so the difference is the
//! whole and only work of a switch.
use std::collections::{HashMap, HashSet};

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap as BpfHashMap, LpmTrie, MapData};
use palisade_ebpf_common::*;
use palisade_model::Snapshot;
use palisade_model::compile::{Cell, CellKey, Changed, Direction};

use super::{KernelError, map_err};

/// An `IDENTITIES` entry without its bank: (address prefix bits, address).
pub(super) type IdKey = (u32, Addr);

/// The content of one bank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Image {
    pub ids: HashMap<IdKey, IdentityValue>,
    pub cells: HashMap<CellKey, PolicyValue>,
}

/// The writes that turn one image into another: deletions, then insertions or updates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    pub ids_delete: Vec<IdKey>,
    pub ids_put: Vec<(IdKey, IdentityValue)>,
    pub cells_delete: Vec<CellKey>,
    pub cells_put: Vec<(CellKey, PolicyValue)>,
}

impl Changes {
    pub fn written(&self) -> usize {
        self.ids_put.len() + self.cells_put.len()
    }

    pub fn deleted(&self) -> usize {
        self.ids_delete.len() + self.cells_delete.len()
    }
}

/// The kernel value of a compiled cell.
pub(super) fn cell_value(c: &Cell) -> PolicyValue {
    let action = match c.action {
        palisade_model::Action::Allow => ACTION_ALLOW,
        palisade_model::Action::Deny => ACTION_DENY,
    };
    PolicyValue { action, rule: c.rule }
}

/// The `IDENTITIES` entries of a snapshot. Where two sources give one prefix (a Service VIP
/// that is also a policy's /32), the later wins: workloads, then address blocks, then VIPs.
pub(super) fn identities_of(snapshot: &Snapshot) -> HashMap<IdKey, IdentityValue> {
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
    workloads
        .chain(blocks)
        .chain(services)
        .map(|(ip, prefix, identity, flags)| ((prefix, addr_from_ip(ip)), IdentityValue { identity, flags }))
        .collect()
}

/// What may have moved in a bank since it was written: the cells named by the compiler's
/// change sets since, and whether the address table may have.
#[derive(Debug, Default)]
pub(super) struct Pending {
    cells: HashSet<CellKey>,
    addresses: bool,
}

impl Pending {
    pub fn and(mut self, changed: &Changed) -> Pending {
        self.cells.extend(changed.cells.iter().copied());
        self.addresses |= changed.addresses;
        self
    }
}

impl Image {
    /// The writes that bring this image to `snapshot`, looking only at what `moved` names
    /// (the address table whole when it may have moved: 10,000 entries, not 100,000 cells).
    pub fn changes_in(&self, moved: &Pending, snapshot: &Snapshot) -> Changes {
        let mut changes = Changes::default();
        if moved.addresses {
            let ids = identities_of(snapshot);
            changes.ids_delete = self.ids.keys().filter(|k| !ids.contains_key(*k)).copied().collect();
            changes.ids_put = ids.iter().filter(|(k, v)| self.ids.get(*k) != Some(*v)).map(|(k, v)| (*k, *v)).collect();
        }
        for key in &moved.cells {
            match (snapshot.cells.get(key).map(cell_value), self.cells.get(key)) {
                (Some(new), old) if old != Some(&new) => changes.cells_put.push((*key, new)),
                (None, Some(_)) => changes.cells_delete.push(*key),
                _ => {}
            }
        }
        changes
    }

    /// The writes that make this image hold `ids` and `cells` (a snapshot's): O(size) lookups
    /// in user space, and only the differences for the kernel.
    pub fn changes_to(&self, ids: &HashMap<IdKey, IdentityValue>, cells: &HashMap<CellKey, Cell>) -> Changes {
        let ids_delete = self.ids.keys().filter(|k| !ids.contains_key(*k)).copied().collect();
        let ids_put = ids.iter().filter(|(k, v)| self.ids.get(*k) != Some(*v)).map(|(k, v)| (*k, *v)).collect();
        let cells_delete = self.cells.keys().filter(|k| !cells.contains_key(*k)).copied().collect();
        let cells_put =
            cells.iter().map(|(k, c)| (*k, cell_value(c))).filter(|(k, v)| self.cells.get(k) != Some(v)).collect();
        Changes { ids_delete, ids_put, cells_delete, cells_put }
    }

    /// This image once `changes` are written.
    pub fn apply(&mut self, changes: &Changes) {
        for k in &changes.ids_delete {
            self.ids.remove(k);
        }
        self.ids.extend(changes.ids_put.iter().copied());
        for k in &changes.cells_delete {
            self.cells.remove(k);
        }
        self.cells.extend(changes.cells_put.iter().copied());
    }
}

pub(super) fn ip_key(bank: u32, (prefix, addr): IdKey) -> Key<IpKey> {
    Key::new(32 + prefix, IpKey { bank, addr })
}

pub(super) fn policy_key(bank: u32, k: &CellKey) -> PolicyKey {
    PolicyKey { bank, src: k.src, dst: k.dst, port: k.port, proto: PROTO_TCP, direction: k.direction.kernel() }
}

/// The compiled form of a kernel key; `None` for a key this ztunnel would never write.
fn cell_key(k: &PolicyKey) -> Option<CellKey> {
    let direction = match k.direction {
        DIRECTION_INGRESS => Direction::Ingress,
        DIRECTION_EGRESS => Direction::Egress,
        _ => return None,
    };
    (k.proto == PROTO_TCP).then_some(CellKey { src: k.src, dst: k.dst, port: k.port, direction })
}

/// Writes `changes` to bank `bank` (deletions first, so the maps never hold more than the
/// larger of the two images). Stops at the first error: the bank is then in an unknown state.
pub(super) fn write(
    identities: &mut LpmTrie<MapData, IpKey, IdentityValue>,
    cells: &mut BpfHashMap<MapData, PolicyKey, PolicyValue>,
    bank: u32,
    changes: &Changes,
) -> Result<(), KernelError> {
    for k in &changes.cells_delete {
        gone(cells.remove(&policy_key(bank, k))).map_err(map_err("POLICY"))?;
    }
    for k in &changes.ids_delete {
        gone(identities.remove(&ip_key(bank, *k))).map_err(map_err("IDENTITIES"))?;
    }
    for (k, v) in &changes.ids_put {
        identities.insert(&ip_key(bank, *k), *v, 0).map_err(map_err("IDENTITIES"))?;
    }
    for (k, v) in &changes.cells_put {
        cells.insert(policy_key(bank, k), *v, 0).map_err(map_err("POLICY"))?;
    }
    Ok(())
}

/// A deletion of a key that is not there has the effect it was made for.
fn gone(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Reads bank `bank` back from the kernel (once after a start, or after a failed write left
/// it unknown). Keys no ztunnel of this layout writes (another bank number, a foreign
/// direction or protocol) are never read by the programs; they are deleted on the way.
pub(super) fn read_back(
    identities: &mut LpmTrie<MapData, IpKey, IdentityValue>,
    cells: &mut BpfHashMap<MapData, PolicyKey, PolicyValue>,
    bank: u32,
) -> Result<Image, KernelError> {
    let mut image = Image::default();
    let mut stray_ids = Vec::new();
    for entry in identities.iter() {
        let (key, value) = entry.map_err(map_err("reading IDENTITIES back"))?;
        let (prefix, data) = (key.prefix_len(), key.data());
        if data.bank > 1 || !(32..=160).contains(&prefix) {
            stray_ids.push(key);
        } else if data.bank == bank {
            image.ids.insert((prefix - 32, data.addr), value);
        }
    }
    let mut stray_cells = Vec::new();
    for entry in cells.iter() {
        let (key, value) = entry.map_err(map_err("reading POLICY back"))?;
        match cell_key(&key) {
            Some(k) if key.bank == bank => {
                image.cells.insert(k, value);
            }
            Some(_) if key.bank <= 1 => {}
            _ => stray_cells.push(key),
        }
    }
    for k in &stray_ids {
        gone(identities.remove(k)).map_err(map_err("IDENTITIES"))?;
    }
    for k in &stray_cells {
        gone(cells.remove(k)).map_err(map_err("POLICY"))?;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_model::Action;

    fn key(src: u32, dst: u32, port: u16) -> CellKey {
        CellKey { src, dst, port, direction: Direction::Ingress }
    }

    fn cells(entries: &[(CellKey, Action, u32)]) -> HashMap<CellKey, Cell> {
        entries.iter().map(|(k, action, rule)| (*k, Cell { action: *action, rule: *rule })).collect()
    }

    fn ids(entries: &[(u8, u32, u32)]) -> HashMap<IdKey, IdentityValue> {
        let addr = |last: u8| addr_from_ip(std::net::Ipv4Addr::new(10, 0, 0, last).into());
        entries
            .iter()
            .map(|(a, identity, flags)| ((128, addr(*a)), IdentityValue { identity: *identity, flags: *flags }))
            .collect()
    }

    /// The image of a bank after writing `cells`/`ids` from empty.
    fn image_of(ids: &HashMap<IdKey, IdentityValue>, cells: &HashMap<CellKey, Cell>) -> Image {
        let mut image = Image::default();
        let changes = image.changes_to(ids, cells);
        image.apply(&changes);
        image
    }

    #[test]
    fn a_change_writes_only_what_differs_and_the_image_follows() {
        let old_cells = cells(&[
            (key(10, 11, 80), Action::Allow, 1),
            (key(10, 12, 80), Action::Allow, 2),
            (key(0, 13, 0), Action::Deny, 3),
        ]);
        let old_ids = ids(&[(1, 10, IDENTITY_WORKLOAD), (2, 11, IDENTITY_WORKLOAD | IDENTITY_DEFAULT_DENY)]);
        let image = image_of(&old_ids, &old_cells);
        assert_eq!(image.cells.len(), 3);

        // One allow removed, one added, one deny turned into an allow with a new rule; one
        // identity gains a flag, one address goes, one comes.
        let new_cells = cells(&[
            (key(10, 11, 80), Action::Allow, 1),
            (key(10, 14, 443), Action::Allow, 4),
            (key(0, 13, 0), Action::Allow, 5),
        ]);
        let new_ids = ids(&[(1, 10, IDENTITY_WORKLOAD | IDENTITY_EGRESS_DEFAULT_DENY), (3, 12, IDENTITY_WORKLOAD)]);
        let changes = image.changes_to(&new_ids, &new_cells);
        assert_eq!(changes.cells_delete, vec![key(10, 12, 80)]);
        let mut put: Vec<_> = changes.cells_put.iter().map(|(k, v)| (k.dst, v.action, v.rule)).collect();
        put.sort();
        assert_eq!(put, vec![(13, ACTION_ALLOW, 5), (14, ACTION_ALLOW, 4)]);
        assert_eq!(changes.ids_delete.len(), 1);
        assert_eq!(changes.ids_put.len(), 2);
        assert_eq!((changes.written(), changes.deleted()), (4, 2));

        let mut next = image.clone();
        next.apply(&changes);
        assert_eq!(next, image_of(&new_ids, &new_cells), "the image after the changes is the new snapshot's");
        assert_eq!(next.changes_to(&new_ids, &new_cells), Changes::default(), "nothing left to write");
    }

    #[test]
    fn two_banks_alternate_and_each_step_costs_the_difference_to_two_generations_back() {
        // Generations 1..=6 each add one allow and drop the oldest: a bank that held g-2
        // needs two puts and two deletes to hold g, whatever the policy's size.
        let base: Vec<_> = (0..1_000u32).map(|i| (key(100 + i, 5, 8080), Action::Allow, i)).collect();
        let generation = |g: u32| {
            let mut c = base.clone();
            c.extend((g..g + 3).map(|i| (key(i, 7, 9000), Action::Allow, 2_000 + i)));
            cells(&c)
        };
        let no_ids = HashMap::new();
        let mut banks = [image_of(&no_ids, &generation(0)), image_of(&no_ids, &generation(1))];
        for g in 2..=6u32 {
            let bank = &mut banks[bank(g) as usize];
            let changes = bank.changes_to(&no_ids, &generation(g));
            assert_eq!((changes.written(), changes.deleted()), (2, 2), "generation {g}");
            bank.apply(&changes);
            assert_eq!(*bank, image_of(&no_ids, &generation(g)));
        }
    }

    #[test]
    fn kernel_keys_round_trip_and_foreign_ones_are_refused() {
        let k = CellKey { src: 3, dst: 0, port: 53, direction: Direction::Egress };
        let p = policy_key(1, &k);
        assert_eq!((p.bank, p.proto, p.direction), (1, PROTO_TCP, DIRECTION_EGRESS));
        assert_eq!(cell_key(&p), Some(k));
        assert_eq!(cell_key(&PolicyKey { direction: 7, ..p }), None);
        assert_eq!(cell_key(&PolicyKey { proto: 17, ..p }), None);
        let ip = ip_key(0, (120, [1, 2, 3, 4]));
        assert_eq!((ip.prefix_len(), ip.data().bank), (152, 0));
    }

    fn located(text: &str) -> palisade_model::load::Located {
        palisade_model::load::parse_str(std::path::Path::new("t.yaml"), text).unwrap().remove(0)
    }

    /// The kernel write driven by the compiler's change sets (two banks, each brought from two
    /// snapshots back) leaves every bank exactly as a full comparison would, along a run of
    /// policy, workload, namespace and Service changes.
    #[test]
    fn diffing_only_what_the_compiler_says_moved_writes_what_a_full_diff_writes() {
        use palisade_model::compile::{Compiler, Identities};
        use palisade_model::key::ResourceKey;
        let workload = |n: usize, app: &str| {
            located(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{n}, namespace: ns{}}}\n\
                 spec: {{serviceAccount: sa{n}, node: n, labels: {{app: {app}}}, addresses: [10.0.{}.{}], \
                 ports: [{{name: http, containerPort: 8080}}]}}\n",
                n % 2,
                n / 200,
                n % 200 + 1
            ))
        };
        let policy = |k: usize, port: u16, action: &str, egress: bool| {
            let rules = match egress {
                true => format!("  egress:\n  - to: [{{service: web}}]\n    ports: [{port}]\n"),
                false => format!("  rules:\n  - from: [{{namespace: ns1}}]\n    ports: [{port}]\n"),
            };
            located(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{k}, namespace: ns0}}\n\
                 spec:\n  selector: {{matchLabels: {{app: a{}}}}}\n  action: {action}\n{rules}",
                k % 3
            ))
        };
        let service = located(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns0}\n\
             spec: {clusterIP: 10.96.0.1, selector: {app: a1}, ports: [{port: 80, targetPort: http}]}\n",
        );
        let namespace = |label: &str| {
            located(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns1, labels: {{team: {label}}}}}\n"))
        };
        let mut compiler = Compiler::new("cluster.local");
        let numbers = Identities::default();
        let mut exact: [Option<Image>; 2] = [None, None];
        let mut driven: [Option<Image>; 2] = [None, None];
        let mut pending: [Option<Pending>; 2] = [None, None];
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for step in 0..120usize {
            let (upserts, removals): (Vec<_>, Vec<ResourceKey>) = match (step, next(6)) {
                (0, _) => {
                    ((0..40).map(|n| workload(n, ["a0", "a1", "a2"][n % 3])).chain([service.clone()]).collect(), vec![])
                }
                (_, 0) => (vec![workload(next(50) as usize, ["a0", "a1", "a2"][next(3) as usize])], vec![]),
                (_, 1) => (vec![], vec![ResourceKey::of(&workload(next(50) as usize, "a0").resource)]),
                (_, 2) => (vec![namespace(["x", "y"][next(2) as usize])], vec![]),
                (_, 3) => (vec![], vec![ResourceKey::of(&policy(next(6) as usize, 0, "Allow", false).resource)]),
                _ => {
                    let k = next(6) as usize;
                    let action = ["Allow", "Deny"][next(2) as usize];
                    (vec![policy(k, 8000 + next(3) as u16, action, k.is_multiple_of(2))], vec![])
                }
            };
            let snapshot = compiler.update(upserts, &removals, &numbers);
            let b = step % 2;
            // The full comparison.
            let mut full = exact[b].take().unwrap_or_default();
            let changes = full.changes_to(&identities_of(&snapshot), &snapshot.cells);
            full.apply(&changes);
            // The driven one, as PolicyMaps::apply does it.
            let mut image = driven[b].take().unwrap_or_default();
            let moved = match (pending[b].take(), snapshot.changed.as_deref()) {
                (Some(p), Some(c)) => Some(p.and(c)),
                _ => None,
            };
            let changes = match &moved {
                Some(m) => image.changes_in(m, &snapshot),
                None => image.changes_to(&identities_of(&snapshot), &snapshot.cells),
            };
            image.apply(&changes);
            assert_eq!(image, full, "step {step}: the driven bank differs from the full comparison");
            pending[b] = Some(Pending::default());
            pending[1 - b] = match (pending[1 - b].take(), snapshot.changed.as_deref()) {
                (Some(p), Some(c)) => Some(p.and(c)),
                _ => None,
            };
            exact[b] = Some(full);
            driven[b] = Some(image);
        }
    }
}
