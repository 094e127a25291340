//! The metadata core (sans-IO): volumes, their mapping trees, reference counts and free space.
//!
//! Every volume, snapshot and clone maps virtual clusters through a three-level radix tree of
//! [`FANOUT`] entries per node. Trees share nodes (`Arc`): a snapshot or clone is a new root
//! pointer to the same tree, O(1) however large the volume. Writing through a shared node
//! copies it first (path copying), so lookups always walk exactly three levels: read cost does
//! not grow with snapshot or clone depth.
//!
//! Reference counts are lazy, as in btrfs: a data cluster counts the *leaves* that point at
//! it, not the volumes. Copying a shared leaf adds one reference to each cluster it maps;
//! releasing the last handle of a leaf drops one. A cluster is shared iff its count is above
//! one or any node on the path to it is shared.
//!
//! Crash safety rules kept here: space freed in the running transaction is not handed out
//! again, and clusters whose count dropped in it are never overwritten in place, until the
//! transaction is committed ([`Meta::committed`]); otherwise the last committed state, which
//! may still reference them, could see new data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::Error;
use crate::error::Structure;
use crate::format::{FANOUT, LEVELS, MAX_VOLUME_CLUSTERS, SUBCLUSTERS};

/// A mapped virtual cluster: its data cluster and which subclusters hold data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Data cluster index.
    pub cluster: u32,
    /// Bit i: subcluster i holds data (0: the entry is unmapped).
    pub bitmap: u16,
}

impl Entry {
    /// True if the entry maps anything.
    pub fn is_mapped(&self) -> bool {
        self.bitmap != 0
    }
}

/// A node of a mapping tree.
#[derive(Clone, Debug)]
pub enum Node {
    /// Level 0: entries.
    Leaf(Box<[Entry; FANOUT]>),
    /// Levels above: children.
    Inner(Box<[Option<Arc<Node>>; FANOUT]>),
}

impl Node {
    fn empty(level: u32) -> Node {
        if level == 0 {
            Node::Leaf(Box::new([Entry::default(); FANOUT]))
        } else {
            Node::Inner(Box::new(std::array::from_fn(|_| None)))
        }
    }
}

/// What a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Writable: a volume or a clone.
    Volume,
    /// Read-only point in time.
    Snapshot,
}

/// Per-volume I/O limits (0: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qos {
    /// Requests per second.
    pub iops: u64,
    /// Bytes per second.
    pub bps: u64,
}

/// A volume, snapshot or clone.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Never-reused id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Volume or snapshot.
    pub kind: Kind,
    /// What it was made from (0: nothing).
    pub parent: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// I/O limits.
    pub qos: Qos,
    /// Root of its mapping tree.
    pub root: Option<Arc<Node>>,
}

/// A metadata change, as journaled: replaying the records of committed transactions on top
/// of a checkpoint rebuilds the state exactly, sharing included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A new empty volume.
    Create {
        /// Id.
        id: u64,
        /// Size in bytes.
        size: u64,
        /// Name.
        name: String,
    },
    /// A snapshot (`kind` Snapshot) or clone (Volume) of `source`.
    Derive {
        /// Source volume or snapshot.
        source: u64,
        /// New id.
        id: u64,
        /// Snapshot or clone.
        kind: Kind,
        /// Name.
        name: String,
    },
    /// A volume's deletion.
    Delete {
        /// Id.
        id: u64,
    },
    /// A new (larger) size.
    Resize {
        /// Id.
        id: u64,
        /// Size in bytes.
        size: u64,
    },
    /// New limits.
    SetQos {
        /// Id.
        id: u64,
        /// Limits.
        qos: Qos,
    },
    /// A leaf entry's new value (unmapped when the bitmap is 0).
    SetEntry {
        /// Volume id.
        id: u64,
        /// Virtual cluster.
        vcluster: u64,
        /// New entry.
        entry: Entry,
    },
}

/// What a volume holds ([`Meta::holdings`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// 4 KiB blocks holding data (written, not released).
    pub written_blocks: u64,
    /// Clusters it maps (shared ones included).
    pub clusters: u64,
    /// Clusters only it references: what deleting it frees.
    pub exclusive_clusters: u64,
}

/// Where a change of one volume can be taken back to (see [`Meta::mark`]).
#[derive(Debug)]
pub struct ChangeMark {
    txn_len: usize,
    id: u64,
    before: Option<Volume>,
}

/// The whole metadata state of a pool.
#[derive(Debug)]
pub struct Meta {
    volumes: BTreeMap<u64, Volume>,
    names: HashMap<String, u64>,
    next_id: u64,
    refs: Vec<u32>,
    free: Vec<u32>,
    pinned: HashSet<u32>,
    pending_free: Vec<u32>,
    deleted_in_txn: bool,
    txn: Vec<Record>,
    /// What a sealed transaction (being committed without the pool's lock) freed, pinned and
    /// deleted: kept so until it is durable.
    sealed: Sealed,
}

#[derive(Debug, Default)]
struct Sealed {
    pinned: HashSet<u32>,
    free: Vec<u32>,
    deleted: bool,
}

fn index(vcluster: u64, level: u32) -> usize {
    ((vcluster >> (9 * level)) as usize) & (FANOUT - 1)
}

/// Cluster count of a byte size, rounded up.
pub fn clusters_of(size: u64) -> u64 {
    size.div_ceil(crate::format::CLUSTER_SIZE as u64)
}

impl Meta {
    /// Empty metadata for `clusters` data clusters, all free.
    pub fn new(clusters: u32) -> Meta {
        Meta {
            volumes: BTreeMap::new(),
            names: HashMap::new(),
            next_id: 1,
            refs: vec![0; clusters as usize],
            free: (0..clusters).rev().collect(),
            pinned: HashSet::new(),
            pending_free: Vec::new(),
            deleted_in_txn: false,
            sealed: Sealed::default(),
            txn: Vec::new(),
        }
    }

    /// Rebuilds metadata from loaded volumes (a checkpoint): reference counts are counted
    /// over the distinct leaves; free space is what no leaf references. Fails on an entry
    /// outside the pool.
    pub fn from_volumes(clusters: u32, volumes: Vec<Volume>, next_id: u64) -> Result<Meta, Error> {
        let mut refs = vec![0u32; clusters as usize];
        let mut seen: HashSet<*const Node> = HashSet::new();
        fn walk(
            node: &Arc<Node>,
            seen: &mut HashSet<*const Node>,
            refs: &mut [u32],
        ) -> Result<(), Error> {
            if !seen.insert(Arc::as_ptr(node)) {
                return Ok(());
            }
            match &**node {
                Node::Leaf(entries) => {
                    for e in entries.iter().filter(|e| e.is_mapped()) {
                        let r = refs.get_mut(e.cluster as usize).ok_or_else(|| {
                            Error::corrupt(
                                Structure::Metadata,
                                format!("entry maps cluster {} beyond the pool", e.cluster),
                            )
                        })?;
                        *r += 1;
                    }
                }
                Node::Inner(children) => {
                    for c in children.iter().flatten() {
                        walk(c, seen, refs)?;
                    }
                }
            }
            Ok(())
        }
        let mut meta = Meta::new(0);
        for v in volumes {
            if let Some(root) = &v.root {
                walk(root, &mut seen, &mut refs)?;
            }
            meta.names.insert(v.name.clone(), v.id);
            meta.volumes.insert(v.id, v);
        }
        meta.next_id = next_id.max(meta.volumes.keys().max().map_or(1, |m| m + 1));
        meta.free = (0..clusters)
            .rev()
            .filter(|c| refs[*c as usize] == 0)
            .collect();
        meta.refs = refs;
        Ok(meta)
    }

    /// All volumes, by id.
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }

    /// A volume by reference: its name, or `#ID` (see [`Meta::id_of`]).
    pub fn volume(&self, reference: &str) -> Option<&Volume> {
        self.id_of(reference)
            .ok()
            .and_then(|id| self.volumes.get(&id))
    }

    /// A volume by id.
    pub fn volume_by_id(&self, id: u64) -> Option<&Volume> {
        self.volumes.get(&id)
    }

    /// The next id to be handed out.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Data clusters in the pool.
    pub fn clusters(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Data clusters not referenced and not waiting for a commit.
    pub fn free_clusters(&self) -> usize {
        self.free.len()
    }

    /// References to a data cluster (leaves that map it).
    pub fn refs(&self, cluster: u32) -> u32 {
        self.refs.get(cluster as usize).copied().unwrap_or(0)
    }

    /// Records of the running (uncommitted) transaction.
    pub fn pending(&self) -> &[Record] {
        &self.txn
    }

    /// The running transaction (and a sealed one) is durable: freed space becomes reusable,
    /// pins are lifted.
    pub fn committed(&mut self) {
        self.txn.clear();
        self.pinned.clear();
        self.deleted_in_txn = false;
        self.free.append(&mut self.pending_free);
        self.sealed_durable();
    }

    /// Ends the running transaction so that it can be committed while changes go on: returns
    /// its records (a new transaction starts empty). What it freed stays unallocatable, and
    /// the clusters it pinned or the deletions it made keep in-place writes away, until
    /// [`Self::sealed_durable`] — or until [`Self::unseal`] hands it back to the running
    /// transaction (the commit failed). One transaction is sealed at a time; sealing again
    /// before either merges into it.
    pub fn seal(&mut self) -> Vec<Record> {
        self.sealed.pinned.extend(self.pinned.drain());
        self.sealed.free.append(&mut self.pending_free);
        self.sealed.deleted |= std::mem::take(&mut self.deleted_in_txn);
        std::mem::take(&mut self.txn)
    }

    /// The sealed transaction is durable.
    pub fn sealed_durable(&mut self) {
        self.sealed.pinned.clear();
        self.free.append(&mut self.sealed.free);
        self.sealed.deleted = false;
    }

    /// The sealed transaction's commit failed: its records go back in front of the running
    /// transaction's, to be committed with it.
    pub fn unseal(&mut self, mut records: Vec<Record>) {
        records.append(&mut self.txn);
        self.txn = records;
        self.pinned.extend(self.sealed.pinned.drain());
        self.pending_free.append(&mut self.sealed.free);
        self.deleted_in_txn |= std::mem::take(&mut self.sealed.deleted);
    }

    /// Marks the point a change of volume `id` can be taken back to: the running
    /// transaction's length and the volume as it is (none for a volume about to be made).
    /// While the mark lives, a deletion of that volume frees nothing: its tree is held here.
    pub fn mark(&self, id: u64) -> ChangeMark {
        ChangeMark {
            txn_len: self.txn.len(),
            id,
            before: self.volumes.get(&id).cloned(),
        }
    }

    /// Takes a change back to its mark (its commit failed): the records it added leave the
    /// running transaction and the volume is as it was. Only valid when nothing else changed
    /// the metadata since the mark, and for changes that neither allocate nor free space
    /// (create, snapshot, clone, delete under a mark, resize, limits).
    pub fn take_back(&mut self, mark: ChangeMark) {
        self.txn.truncate(mark.txn_len);
        if let Some(now) = self.volumes.remove(&mark.id) {
            self.names.remove(&now.name);
        }
        if let Some(before) = mark.before {
            self.names.insert(before.name.clone(), before.id);
            self.volumes.insert(before.id, before);
        }
    }

    /// The change since `mark` is durable: a volume it deleted releases its space now, and
    /// what only it referenced is free at once (its deletion is committed already).
    pub fn finish(&mut self, mark: ChangeMark) {
        let Some(before) = mark.before else {
            return;
        };
        if self.volumes.contains_key(&mark.id) {
            return;
        }
        if let Some(root) = before.root {
            let from = self.pending_free.len();
            self.release(root);
            let freed: Vec<u32> = self.pending_free.drain(from..).collect();
            for c in &freed {
                self.pinned.remove(c);
            }
            self.free.extend(freed);
        }
    }

    /// Recomputes free space from the reference counts (after a replay).
    pub fn rebuild_free(&mut self) {
        let pending: HashSet<u32> = self
            .pending_free
            .iter()
            .chain(&self.sealed.free)
            .copied()
            .collect();
        self.free = (0..self.refs.len() as u32)
            .rev()
            .filter(|c| self.refs[*c as usize] == 0 && !pending.contains(c))
            .collect();
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        // The one rule for names (64 bytes: what a volume record holds, NAME_LEN).
        daemon_kit::names::check_name("volume", name).map_err(Error::Invalid)?;
        if self.names.contains_key(name) {
            return Err(Error::Exists(name.into()));
        }
        Ok(())
    }

    /// The id a volume reference names: a volume's name, or `#ID`, its identity (ids are
    /// never reused, and no name starts with `#`): a connection bound to `#ID` can never
    /// reach a later volume that took the name.
    pub fn id_of(&self, reference: &str) -> Result<u64, Error> {
        let id = match reference.strip_prefix('#') {
            Some(id) => id.parse().ok().filter(|id| self.volumes.contains_key(id)),
            None => self.names.get(reference).copied(),
        };
        id.ok_or_else(|| match reference.strip_prefix('#') {
            Some(_) => Error::NotFound(format!(
                "{reference} (the volume this connection was made to was deleted)"
            )),
            None => Error::NotFound(reference.into()),
        })
    }

    /// Creates an empty (thin) volume.
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<u64, Error> {
        self.check_name(name)?;
        check_size(size)?;
        let id = self.next_id;
        self.record(Record::Create {
            id,
            size,
            name: name.into(),
        })?;
        Ok(id)
    }

    /// A read-only snapshot of a volume (or of a snapshot), O(1).
    pub fn snapshot(&mut self, source: &str, name: &str) -> Result<u64, Error> {
        self.derive(source, name, Kind::Snapshot)
    }

    /// A writable clone of a snapshot, O(1).
    pub fn clone_snapshot(&mut self, snapshot: &str, name: &str) -> Result<u64, Error> {
        let src = self
            .volume(snapshot)
            .ok_or_else(|| Error::NotFound(snapshot.into()))?;
        if src.kind != Kind::Snapshot {
            return Err(Error::Invalid(format!(
                "{snapshot} is not a snapshot: clones are made from snapshots"
            )));
        }
        self.derive(snapshot, name, Kind::Volume)
    }

    fn derive(&mut self, source: &str, name: &str, kind: Kind) -> Result<u64, Error> {
        let source = self.id_of(source)?;
        self.check_name(name)?;
        let id = self.next_id;
        self.record(Record::Derive {
            source,
            id,
            kind,
            name: name.into(),
        })?;
        Ok(id)
    }

    /// Deletes a volume or snapshot; space only it referenced is freed (at commit).
    pub fn delete(&mut self, name: &str) -> Result<(), Error> {
        let id = self.id_of(name)?;
        self.record(Record::Delete { id })
    }

    /// Grows a volume.
    pub fn resize(&mut self, name: &str, size: u64) -> Result<(), Error> {
        let id = self.id_of(name)?;
        let v = &self.volumes[&id];
        if v.kind == Kind::Snapshot {
            return Err(Error::ReadOnly(name.into()));
        }
        if size < v.size {
            return Err(Error::Invalid(format!(
                "{name}: shrinking ({} -> {size} bytes) is not supported",
                v.size
            )));
        }
        check_size(size)?;
        self.record(Record::Resize { id, size })
    }

    /// Sets a volume's I/O limits.
    pub fn set_qos(&mut self, name: &str, qos: Qos) -> Result<(), Error> {
        let id = self.id_of(name)?;
        self.record(Record::SetQos { id, qos })
    }

    /// The entry of a virtual cluster (unmapped if none).
    pub fn lookup(&self, id: u64, vcluster: u64) -> Entry {
        let Some(mut node) = self.volumes.get(&id).and_then(|v| v.root.as_ref()) else {
            return Entry::default();
        };
        for level in (1..LEVELS).rev() {
            match &**node {
                Node::Inner(children) => match &children[index(vcluster, level)] {
                    Some(c) => node = c,
                    None => return Entry::default(),
                },
                Node::Leaf(_) => return Entry::default(),
            }
        }
        match &**node {
            Node::Leaf(entries) => entries[index(vcluster, 0)],
            Node::Inner(_) => Entry::default(),
        }
    }

    /// True if the data of a mapped virtual cluster may be overwritten in place: nothing else
    /// references it now, and nothing did in the last committed state.
    pub fn exclusive(&self, id: u64, vcluster: u64) -> bool {
        // A delete in this transaction may have ended sharing that the committed state still
        // has (a deleted snapshot's nodes): until the commit, nothing is overwritten in place.
        if self.deleted_in_txn || self.sealed.deleted {
            return false;
        }
        let Some(mut node) = self.volumes.get(&id).and_then(|v| v.root.as_ref()) else {
            return false;
        };
        if Arc::strong_count(node) > 1 {
            return false;
        }
        for level in (1..LEVELS).rev() {
            let Node::Inner(children) = &**node else {
                return false;
            };
            match &children[index(vcluster, level)] {
                Some(c) if Arc::strong_count(c) == 1 => node = c,
                _ => return false,
            }
        }
        let Node::Leaf(entries) = &**node else {
            return false;
        };
        let e = entries[index(vcluster, 0)];
        e.is_mapped()
            && self.refs(e.cluster) == 1
            && !self.pinned.contains(&e.cluster)
            && !self.sealed.pinned.contains(&e.cluster)
    }

    /// Takes a free cluster for new data. Give it back with [`Self::unallocate`] if it ends up
    /// unused.
    pub fn allocate(&mut self) -> Result<u32, Error> {
        self.free.pop().ok_or(Error::NoSpace)
    }

    /// Returns a cluster from [`Self::allocate`] that no entry took.
    pub fn unallocate(&mut self, cluster: u32) {
        if self.refs(cluster) == 0 {
            self.free.push(cluster);
        }
    }

    /// Sets a virtual cluster's entry of a writable volume.
    pub fn set_entry(&mut self, id: u64, vcluster: u64, entry: Entry) -> Result<(), Error> {
        let v = self
            .volumes
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("volume id {id}")))?;
        if v.kind == Kind::Snapshot {
            return Err(Error::ReadOnly(v.name.clone()));
        }
        if vcluster >= clusters_of(v.size) {
            return Err(Error::OutOfRange(format!(
                "cluster {vcluster} of {} ({} bytes)",
                v.name, v.size
            )));
        }
        if entry.is_mapped() && entry.cluster as usize >= self.refs.len() {
            return Err(Error::corrupt(
                Structure::Metadata,
                format!("cluster {} beyond the pool", entry.cluster),
            ));
        }
        self.record(Record::SetEntry {
            id,
            vcluster,
            entry,
        })
    }

    /// Applies a change and journals it.
    fn record(&mut self, r: Record) -> Result<(), Error> {
        self.apply(&r)?;
        self.txn.push(r);
        Ok(())
    }

    /// Applies a journaled change (replay, or a live change already validated).
    pub fn apply(&mut self, r: &Record) -> Result<(), Error> {
        match r {
            Record::Create { id, size, name } => {
                self.insert_volume(Volume {
                    id: *id,
                    name: name.clone(),
                    kind: Kind::Volume,
                    parent: 0,
                    size: *size,
                    qos: Qos::default(),
                    root: None,
                })?;
            }
            Record::Derive {
                source,
                id,
                kind,
                name,
            } => {
                let src = self.volumes.get(source).ok_or_else(|| {
                    Error::corrupt(
                        Structure::Metadata,
                        format!("derive from unknown volume {source}"),
                    )
                })?;
                let v = Volume {
                    id: *id,
                    name: name.clone(),
                    kind: *kind,
                    parent: *source,
                    size: src.size,
                    qos: Qos::default(),
                    root: src.root.clone(),
                };
                self.insert_volume(v)?;
            }
            Record::Delete { id } => {
                let v = self.volumes.remove(id).ok_or_else(|| {
                    Error::corrupt(
                        Structure::Metadata,
                        format!("delete of unknown volume {id}"),
                    )
                })?;
                self.names.remove(&v.name);
                self.deleted_in_txn = true;
                if let Some(root) = v.root {
                    self.release(root);
                }
            }
            Record::Resize { id, size } => {
                self.volumes
                    .get_mut(id)
                    .ok_or_else(|| {
                        Error::corrupt(
                            Structure::Metadata,
                            format!("resize of unknown volume {id}"),
                        )
                    })?
                    .size = *size;
            }
            Record::SetQos { id, qos } => {
                self.volumes
                    .get_mut(id)
                    .ok_or_else(|| {
                        Error::corrupt(
                            Structure::Metadata,
                            format!("limits of unknown volume {id}"),
                        )
                    })?
                    .qos = *qos;
            }
            Record::SetEntry {
                id,
                vcluster,
                entry,
            } => self.apply_entry(*id, *vcluster, *entry)?,
        }
        Ok(())
    }

    fn insert_volume(&mut self, v: Volume) -> Result<(), Error> {
        if self.volumes.contains_key(&v.id) || self.names.contains_key(&v.name) {
            return Err(Error::corrupt(
                Structure::Metadata,
                format!("volume {} ({}) exists", v.id, v.name),
            ));
        }
        self.next_id = self.next_id.max(v.id + 1);
        self.names.insert(v.name.clone(), v.id);
        self.volumes.insert(v.id, v);
        Ok(())
    }

    fn decref(&mut self, cluster: u32) {
        if let Some(r) = self.refs.get_mut(cluster as usize) {
            *r = r.saturating_sub(1);
            self.pinned.insert(cluster);
            if *r == 0 {
                self.pending_free.push(cluster);
            }
        }
    }

    /// Drops one handle of a subtree; what no one else holds is released recursively.
    fn release(&mut self, node: Arc<Node>) {
        let mut stack = vec![node];
        while let Some(n) = stack.pop() {
            if let Ok(owned) = Arc::try_unwrap(n) {
                match owned {
                    Node::Leaf(entries) => {
                        for e in entries.iter().filter(|e| e.is_mapped()) {
                            self.decref(e.cluster);
                        }
                    }
                    Node::Inner(children) => stack.extend(children.into_iter().flatten()),
                }
            }
        }
    }

    fn apply_entry(&mut self, id: u64, vcluster: u64, entry: Entry) -> Result<(), Error> {
        if vcluster >= MAX_VOLUME_CLUSTERS {
            return Err(Error::corrupt(
                Structure::Metadata,
                format!("cluster {vcluster} beyond any volume"),
            ));
        }
        if entry.is_mapped() && entry.cluster as usize >= self.refs.len() {
            return Err(Error::corrupt(
                Structure::Metadata,
                format!("cluster {} beyond the pool", entry.cluster),
            ));
        }
        let mut root = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| {
                Error::corrupt(Structure::Metadata, format!("entry of unknown volume {id}"))
            })?
            .root
            .take();
        let mut added: Vec<u32> = Vec::new();
        let old = {
            let mut node = root.get_or_insert_with(|| Arc::new(Node::empty(LEVELS - 1)));
            for level in (1..LEVELS).rev() {
                let Node::Inner(children) = Arc::make_mut(node) else {
                    unreachable!("inner levels hold inner nodes")
                };
                node = children[index(vcluster, level)]
                    .get_or_insert_with(|| Arc::new(Node::empty(level - 1)));
            }
            // Copying a shared leaf gives each cluster it maps one more referencing leaf.
            if Arc::strong_count(node) > 1
                && let Node::Leaf(entries) = &**node
            {
                added.extend(entries.iter().filter(|e| e.is_mapped()).map(|e| e.cluster));
            }
            let Node::Leaf(entries) = Arc::make_mut(node) else {
                unreachable!("level 0 holds leaves")
            };
            let slot = &mut entries[index(vcluster, 0)];
            let old = *slot;
            *slot = if entry.is_mapped() {
                entry
            } else {
                Entry::default()
            };
            old
        };
        if let Some(v) = self.volumes.get_mut(&id) {
            v.root = root;
        }
        for c in added {
            self.refs[c as usize] += 1;
        }
        let new = entry.is_mapped().then_some(entry.cluster);
        let old_c = old.is_mapped().then_some(old.cluster);
        if new != old_c {
            if let Some(c) = new {
                // Live, `c` came from allocate(); in replay the free list is rebuilt after.
                self.refs[c as usize] += 1;
            }
            if let Some(c) = old_c {
                self.decref(c);
            }
        }
        Ok(())
    }

    /// Bytes of data clusters a volume references (shared ones included).
    pub fn allocated_bytes(&self, id: u64) -> u64 {
        let mut n = 0u64;
        self.for_each_entry(id, |_, e| n += e.bitmap.count_ones() as u64);
        n * crate::format::BLOCK_SIZE as u64
    }

    /// The virtual clusters whose entries differ between volume `from` (or an empty volume)
    /// and volume `to`, in order, with both entries. Subtrees the two share are skipped
    /// without a look inside, so the cost follows the changes, not the volume size.
    pub fn diff(&self, from: Option<u64>, to: u64) -> Vec<(u64, Entry, Entry)> {
        fn entry_at(node: Option<&Node>, i: usize) -> Entry {
            match node {
                Some(Node::Leaf(entries)) => entries[i],
                _ => Entry::default(),
            }
        }
        fn child(node: Option<&Node>, i: usize) -> Option<&Arc<Node>> {
            match node {
                Some(Node::Inner(children)) => children[i].as_ref(),
                _ => None,
            }
        }
        fn walk(
            a: Option<&Arc<Node>>,
            b: Option<&Arc<Node>>,
            level: u32,
            base: u64,
            out: &mut Vec<(u64, Entry, Entry)>,
        ) {
            match (a, b) {
                (None, None) => return,
                (Some(x), Some(y)) if Arc::ptr_eq(x, y) => return,
                _ => {}
            }
            let (a, b) = (a.map(|n| &**n), b.map(|n| &**n));
            for i in 0..FANOUT {
                if level == 0 {
                    let (ea, eb) = (entry_at(a, i), entry_at(b, i));
                    if ea != eb {
                        out.push((base + i as u64, ea, eb));
                    }
                } else {
                    let step = (FANOUT as u64).pow(level);
                    walk(
                        child(a, i),
                        child(b, i),
                        level - 1,
                        base + i as u64 * step,
                        out,
                    );
                }
            }
        }
        let root = |id: u64| self.volumes.get(&id).and_then(|v| v.root.as_ref());
        let mut out = Vec::new();
        walk(from.and_then(root), root(to), LEVELS - 1, 0, &mut out);
        out
    }

    /// Calls `f` for every mapped entry of a volume, in virtual order.
    pub fn for_each_entry(&self, id: u64, mut f: impl FnMut(u64, Entry)) {
        fn walk(node: &Node, level: u32, base: u64, f: &mut dyn FnMut(u64, Entry)) {
            match node {
                Node::Leaf(entries) => {
                    for (i, e) in entries.iter().enumerate() {
                        if e.is_mapped() {
                            f(base + i as u64, *e);
                        }
                    }
                }
                Node::Inner(children) => {
                    for (i, c) in children.iter().enumerate() {
                        if let Some(c) = c {
                            walk(c, level - 1, base + ((i as u64) << (9 * level)), f);
                        }
                    }
                }
            }
        }
        if let Some(root) = self.volumes.get(&id).and_then(|v| v.root.as_ref()) {
            walk(root, LEVELS - 1, 0, &mut f);
        }
    }

    /// What volume `id` holds: blocks written, clusters mapped, and the clusters only it
    /// references (what deleting it would free).
    pub fn holdings(&self, id: u64) -> Holdings {
        fn walk(meta: &Meta, node: &Arc<Node>, shared: bool, h: &mut Holdings) {
            let shared = shared || Arc::strong_count(node) > 1;
            match &**node {
                Node::Leaf(entries) => {
                    for e in entries.iter().filter(|e| e.is_mapped()) {
                        h.written_blocks += e.bitmap.count_ones() as u64;
                        h.clusters += 1;
                        if !shared && meta.refs(e.cluster) == 1 {
                            h.exclusive_clusters += 1;
                        }
                    }
                }
                Node::Inner(children) => {
                    for c in children.iter().flatten() {
                        walk(meta, c, shared, h);
                    }
                }
            }
        }
        let mut h = Holdings::default();
        if let Some(root) = self.volumes.get(&id).and_then(|v| v.root.as_ref()) {
            walk(self, root, false, &mut h);
        }
        h
    }

    /// Clusters freed by the running or sealed transaction: free once it is committed.
    pub fn pending_free_clusters(&self) -> usize {
        self.pending_free.len() + self.sealed.free.len()
    }

    /// Adds data clusters up to `clusters` in all (the pool grew); they are free.
    pub fn grow(&mut self, clusters: u32) {
        let old = self.refs.len() as u32;
        if clusters <= old {
            return;
        }
        self.refs.resize(clusters as usize, 0);
        // Lower clusters first, as on creation (`allocate` takes from the end).
        let mut free: Vec<u32> = (old..clusters).rev().collect();
        free.append(&mut self.free);
        self.free = free;
    }

    /// Takes back [`Self::grow`] (its commit failed): the clusters above `clusters` go.
    /// Only valid while none of them was allocated.
    pub fn shrink_back(&mut self, clusters: u32) {
        self.refs.truncate(clusters as usize);
        self.free.retain(|c| *c < clusters);
    }

    /// Clusters referenced by at least one leaf.
    pub fn used_clusters(&self) -> usize {
        self.refs.iter().filter(|r| **r > 0).count()
    }
}

fn check_size(size: u64) -> Result<(), Error> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(Error::Invalid(format!(
            "volume size {size}: a positive multiple of 512 bytes"
        )));
    }
    if clusters_of(size) > MAX_VOLUME_CLUSTERS {
        return Err(Error::Invalid(format!(
            "volume size {size}: at most {} bytes",
            MAX_VOLUME_CLUSTERS * crate::format::CLUSTER_SIZE as u64
        )));
    }
    Ok(())
}

/// Bitmap of the subclusters a byte range of one cluster touches.
pub fn subcluster_mask(start_in_cluster: usize, len: usize) -> u16 {
    let bs = crate::format::BLOCK_SIZE;
    let first = start_in_cluster / bs;
    let last = (start_in_cluster + len - 1) / bs;
    let mut m = 0u16;
    for i in first..=last.min(SUBCLUSTERS - 1) {
        m |= 1 << i;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(cluster: u32) -> Entry {
        Entry { cluster, bitmap: 1 }
    }

    #[test]
    fn snapshots_share_until_written_and_deletes_free_exactly() {
        let mut m = Meta::new(100);
        let v = m.create_volume("v", 1 << 30).unwrap();
        let c = m.allocate().unwrap();
        m.set_entry(v, 7, e(c)).unwrap();
        m.committed();
        assert!(m.exclusive(v, 7));
        let s = m.snapshot("v", "s").unwrap();
        assert!(!m.exclusive(v, 7), "shared with the snapshot");
        assert_eq!(m.lookup(s, 7), e(c));
        // Writing the volume copies its path; the snapshot keeps the old cluster.
        let c2 = m.allocate().unwrap();
        m.set_entry(v, 7, e(c2)).unwrap();
        assert_eq!(m.lookup(s, 7), e(c));
        assert_eq!(m.lookup(v, 7), e(c2));
        assert_eq!(m.refs(c), 1);
        m.committed();
        assert!(m.exclusive(v, 7));
        // Deleting the snapshot frees its cluster, but only after the commit.
        let free = m.free_clusters();
        m.delete("s").unwrap();
        assert_eq!(m.free_clusters(), free);
        m.committed();
        assert_eq!(m.free_clusters(), free + 1);
        assert_eq!(m.used_clusters(), 1);
    }

    #[test]
    fn a_sealed_transaction_keeps_its_freed_space_until_durable_or_hands_it_back() {
        let mut m = Meta::new(100);
        let v = m.create_volume("v", 1 << 30).unwrap();
        let c = m.allocate().unwrap();
        m.set_entry(v, 0, e(c)).unwrap();
        m.snapshot("v", "s").unwrap();
        m.committed();
        let free = m.free_clusters();
        let c2 = m.allocate().unwrap();
        m.set_entry(v, 0, e(c2)).unwrap();
        m.delete("s").unwrap();
        let sealed = m.seal();
        assert_eq!(sealed.len(), 2, "the entry and the delete");
        assert!(m.pending().is_empty());
        // A new transaction meanwhile: c stays unallocatable, the volume not exclusive.
        let c3 = m.allocate().unwrap();
        m.set_entry(v, 1, e(c3)).unwrap();
        assert!(!m.exclusive(v, 0), "a delete is being committed");
        assert_eq!(m.free_clusters(), free - 2, "c is not free yet");
        // The commit failed: its records go first again, its space stays pinned.
        let later = m.pending().to_vec();
        m.unseal(sealed.clone());
        assert_eq!(m.pending()[..2], sealed[..]);
        assert_eq!(m.pending()[2..], later[..]);
        assert!(!m.exclusive(v, 0));
        m.seal();
        m.sealed_durable();
        assert!(m.exclusive(v, 0));
        assert_eq!(m.free_clusters(), free - 2 + 1, "c is free once durable");
    }

    #[test]
    fn a_cluster_whose_count_dropped_is_not_overwritten_before_commit() {
        let mut m = Meta::new(10);
        let v = m.create_volume("v", 1 << 20).unwrap();
        let c = m.allocate().unwrap();
        m.set_entry(v, 0, e(c)).unwrap();
        m.snapshot("v", "s").unwrap();
        m.committed();
        let c2 = m.allocate().unwrap();
        m.set_entry(v, 0, e(c2)).unwrap();
        m.delete("v").unwrap();
        // Only the snapshot maps c now, but its count dropped in this transaction.
        let clone = m.clone_snapshot("s", "c").unwrap();
        m.committed();
        assert!(!m.exclusive(clone, 0), "shared leaf");
    }

    #[test]
    fn deep_snapshot_chains_keep_lookups_three_levels_deep() {
        let mut m = Meta::new(1000);
        let v = m.create_volume("v", 1 << 30).unwrap();
        for i in 0..100u64 {
            let c = m.allocate().unwrap();
            m.set_entry(v, i, e(c)).unwrap();
            m.snapshot("v", &format!("s{i}")).unwrap();
        }
        let s0 = m.volume("s0").unwrap().id;
        assert!(m.lookup(s0, 0).is_mapped());
        assert!(!m.lookup(s0, 1).is_mapped());
        for i in 0..100 {
            m.delete(&format!("s{i}")).unwrap();
        }
        m.committed();
        assert_eq!(m.used_clusters(), 100);
    }

    #[test]
    fn diffs_skip_shared_subtrees_and_find_every_change() {
        let mut m = Meta::new(100);
        let v = m.create_volume("v", 1 << 36).unwrap();
        for vc in [3u64, 600, 300_000] {
            let c = m.allocate().unwrap();
            m.set_entry(v, vc, e(c)).unwrap();
        }
        let s1 = m.snapshot("v", "s1").unwrap();
        assert!(m.diff(Some(s1), v).is_empty());
        let c = m.allocate().unwrap();
        m.set_entry(
            v,
            600,
            Entry {
                cluster: c,
                bitmap: 3,
            },
        )
        .unwrap();
        m.set_entry(v, 300_000, Entry::default()).unwrap();
        let d: Vec<u64> = m.diff(Some(s1), v).iter().map(|(vc, _, _)| *vc).collect();
        assert_eq!(d, vec![600, 300_000]);
        let all: Vec<u64> = m.diff(None, s1).iter().map(|(vc, _, _)| *vc).collect();
        assert_eq!(all, vec![3, 600, 300_000]);
    }

    #[test]
    fn bad_calls_get_clear_errors() {
        let mut m = Meta::new(10);
        assert!(matches!(m.create_volume("", 4096), Err(Error::Invalid(_))));
        assert!(matches!(
            m.create_volume("a/b", 4096),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(m.create_volume("v", 1000), Err(Error::Invalid(_))));
        m.create_volume("v", 4096).unwrap();
        assert!(matches!(m.create_volume("v", 4096), Err(Error::Exists(_))));
        assert!(matches!(m.snapshot("nope", "s"), Err(Error::NotFound(_))));
        assert!(matches!(m.clone_snapshot("v", "c"), Err(Error::Invalid(_))));
        let s = m.snapshot("v", "s").unwrap();
        assert!(matches!(m.set_entry(s, 0, e(1)), Err(Error::ReadOnly(_))));
        let v = m.volume("v").unwrap().id;
        assert!(matches!(m.set_entry(v, 1, e(1)), Err(Error::OutOfRange(_))));
        assert!(matches!(m.resize("v", 512), Err(Error::Invalid(_))));
        for _ in 0..10 {
            m.allocate().unwrap();
        }
        assert!(matches!(m.allocate(), Err(Error::NoSpace)));
    }

    #[test]
    fn masks_cover_the_touched_subclusters() {
        assert_eq!(subcluster_mask(0, 4096), 1);
        assert_eq!(subcluster_mask(512, 512), 1);
        assert_eq!(subcluster_mask(4095, 2), 0b11);
        assert_eq!(subcluster_mask(0, 65536), 0xffff);
    }
}
