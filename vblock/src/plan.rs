//! What a read or a write does to a volume's clusters, decided by pure code over [`Meta`]:
//! no device, no locks. The pool executes plans (see `pool.rs`); this module decides.
//!
//! A write is split at cluster boundaries into [`WritePiece`]s, each of which goes
//! - [`Target::InPlace`] into the cluster it maps, when the volume alone holds that cluster
//!   now and held it alone in the last committed state ([`Meta::exclusive`]);
//! - [`Target::Fresh`] into a free cluster, when the virtual cluster maps nothing yet;
//! - [`Target::CopyOnWrite`] into a free cluster, with the valid subclusters the write does
//!   not cover copied from the shared one, otherwise.
//!
//! That choice is made in one place, [`Meta::plan_write`]; free clusters are taken there too
//! (never one freed by the running transaction: [`Meta::allocate`] only hands out space the
//! last commit freed). A plan is then carried out by I/O and recorded by
//! [`Meta::apply_write`], or its clusters are given back by [`Meta::give_back`].

use crate::Error;
use crate::format::{BLOCK_SIZE, CLUSTER_SIZE, SUBCLUSTERS};
use crate::meta::{Entry, Meta, subcluster_mask};

/// Where the bytes of one piece of a write go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Into the cluster the virtual cluster maps, which only this volume holds.
    InPlace {
        /// The cluster written.
        cluster: u32,
    },
    /// Into a cluster taken from the free space: the virtual cluster mapped nothing.
    Fresh {
        /// The cluster taken.
        cluster: u32,
    },
    /// Into a cluster taken from the free space, because the mapped one is shared: the valid
    /// subclusters the write does not cover are copied over.
    CopyOnWrite {
        /// The shared cluster the virtual cluster maps now.
        from: u32,
        /// The cluster taken.
        to: u32,
        /// Subclusters copied from `from` (valid there, not covered by the write).
        keep: u16,
    },
}

/// The part of a write inside one virtual cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritePiece {
    /// Virtual cluster.
    pub vcluster: u64,
    /// Start of the write in the cluster, in bytes.
    pub start: usize,
    /// Where the piece's bytes start in the request's data.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
    /// The virtual cluster's entry when the plan was made.
    pub old: Entry,
    /// Where the data goes.
    pub target: Target,
}

impl WritePiece {
    /// The cluster the data is written to.
    pub fn cluster(&self) -> u32 {
        match self.target {
            Target::InPlace { cluster } | Target::Fresh { cluster } => cluster,
            Target::CopyOnWrite { to, .. } => to,
        }
    }

    /// The cluster taken from the free space for this piece, if any.
    pub fn taken(&self) -> Option<u32> {
        match self.target {
            Target::InPlace { .. } => None,
            Target::Fresh { cluster } => Some(cluster),
            Target::CopyOnWrite { to, .. } => Some(to),
        }
    }

    /// Subclusters the write touches.
    pub fn touched(&self) -> u16 {
        subcluster_mask(self.start, self.len)
    }

    /// Subclusters the write covers whole.
    pub fn covered(&self) -> u16 {
        let first = self.start.div_ceil(BLOCK_SIZE);
        let end = (self.start + self.len) / BLOCK_SIZE;
        (first..end).fold(0u16, |m, k| m | (1 << k))
    }

    /// Subclusters the write touches in part: the block is completed with its old content
    /// (or zeros where it held none) and written whole.
    pub fn partial(&self) -> u16 {
        self.touched() & !self.covered()
    }

    /// Subclusters whose old content must be read first: the partial ones that hold data,
    /// and the ones copied on write.
    pub fn reads(&self) -> u16 {
        let merged = self.partial() & self.old.bitmap;
        match self.target {
            Target::InPlace { .. } => merged,
            Target::Fresh { .. } => 0,
            Target::CopyOnWrite { keep, .. } => merged | keep,
        }
    }

    /// The cluster the old content of [`Self::reads`] is read from.
    pub fn read_from(&self) -> u32 {
        match self.target {
            Target::CopyOnWrite { from, .. } => from,
            _ => self.old.cluster,
        }
    }

    /// Subclusters written from a cluster-sized buffer (partial blocks completed, copies),
    /// rather than straight from the request's data.
    pub fn buffered(&self) -> u16 {
        match self.target {
            Target::CopyOnWrite { keep, .. } => self.partial() | keep,
            _ => self.partial(),
        }
    }

    /// The entry after the write.
    pub fn new_entry(&self) -> Entry {
        let kept = match self.target {
            Target::InPlace { .. } | Target::CopyOnWrite { .. } => self.old.bitmap,
            Target::Fresh { .. } => 0,
        };
        Entry {
            cluster: self.cluster(),
            bitmap: kept | self.touched(),
        }
    }

    /// True if the write only overwrites whole blocks that hold data, in place: nothing to
    /// read, no metadata to change.
    pub fn is_overwrite(&self) -> bool {
        matches!(self.target, Target::InPlace { .. })
            && self.partial() == 0
            && self.old.bitmap & self.touched() == self.touched()
    }
}

/// A planned write of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WritePlan {
    /// The volume's id.
    pub volume: u64,
    /// The pieces, in the request's order.
    pub pieces: Vec<WritePiece>,
}

impl WritePlan {
    /// True if every piece overwrites valid whole blocks in place: the write changes no
    /// metadata and may run beside other writes and reads under a shared lock (nothing can
    /// start sharing those clusters meanwhile: that takes the lock exclusively).
    pub fn is_overwrite(&self) -> bool {
        self.pieces.iter().all(WritePiece::is_overwrite)
    }

    /// True if every piece goes into a cluster taken for it: its I/O reads nothing and writes
    /// only where nothing points yet, so it needs no lock; [`Meta::apply_write`] then checks
    /// that nobody mapped those virtual clusters meanwhile.
    pub fn is_fresh_only(&self) -> bool {
        self.pieces
            .iter()
            .all(|p| matches!(p.target, Target::Fresh { .. }))
    }
}

/// What [`Meta::apply_write`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Every piece is mapped as planned.
    Done,
    /// A virtual cluster changed since the plan was made (another writer, without the lock
    /// in between): the pieces before it are mapped, that one and the rest are not. The
    /// write must be planned and carried out again.
    Stale,
}

/// Where the bytes of a span of a read come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// Never written, or discarded: the span reads as zeros.
    Zeros,
    /// Data at this byte offset of the data area (cluster × cluster size + offset in it).
    Data(u64),
}

/// A span of a read: bytes `[at, at + len)` of the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSpan {
    /// Start in the caller's buffer.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
    /// Where the bytes come from.
    pub source: ReadSource,
}

/// A byte range split at cluster boundaries: (virtual cluster, start in it, start in the
/// range, length).
pub fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let vc = pos / CLUSTER_SIZE as u64;
        let start = (pos % CLUSTER_SIZE as u64) as usize;
        let n = (CLUSTER_SIZE - start).min(len - at);
        let piece = (vc, start, at, n);
        at += n;
        Some(piece)
    })
}

/// The virtual clusters a byte range touches.
pub fn vclusters(offset: u64, len: usize) -> std::ops::RangeInclusive<u64> {
    let first = offset / CLUSTER_SIZE as u64;
    let last = (offset + len.max(1) as u64 - 1) / CLUSTER_SIZE as u64;
    first..=last
}

/// Runs of set bits of a subcluster mask, as `[first, end)` subcluster ranges.
pub fn runs(mask: u16) -> impl Iterator<Item = (usize, usize)> {
    let mut k = 0usize;
    std::iter::from_fn(move || {
        while k < SUBCLUSTERS && mask & (1 << k) == 0 {
            k += 1;
        }
        if k >= SUBCLUSTERS {
            return None;
        }
        let first = k;
        while k < SUBCLUSTERS && mask & (1 << k) != 0 {
            k += 1;
        }
        Some((first, k))
    })
}

impl Meta {
    /// The one decision of the write path, for one virtual cluster: in place, fresh, or
    /// copy-on-write, given its entry. Cluster numbers of new data are not taken here.
    fn target_of(&self, id: u64, vcluster: u64, old: Entry, covered: u16) -> Target {
        if !old.is_mapped() {
            Target::Fresh { cluster: 0 }
        } else if self.exclusive(id, vcluster) {
            Target::InPlace {
                cluster: old.cluster,
            }
        } else {
            Target::CopyOnWrite {
                from: old.cluster,
                to: 0,
                keep: old.bitmap & !covered,
            }
        }
    }

    /// The pieces of a write of `len` bytes at `offset` into volume `id`, before any free
    /// cluster is taken (`Fresh` and `CopyOnWrite` pieces name cluster 0 as their target).
    fn pieces_of(&self, id: u64, offset: u64, len: usize) -> Vec<WritePiece> {
        pieces(offset, len)
            .map(|(vcluster, start, at, len)| self.piece_at(id, vcluster, start, at, len))
            .collect()
    }

    /// One piece, planned: its old entry and its target (no cluster taken yet).
    fn piece_at(&self, id: u64, vcluster: u64, start: usize, at: usize, len: usize) -> WritePiece {
        let old = self.lookup(id, vcluster);
        let mut piece = WritePiece {
            vcluster,
            start,
            at,
            len,
            old,
            target: Target::Fresh { cluster: 0 },
        };
        piece.target = self.target_of(id, vcluster, old, piece.covered());
        piece
    }

    /// The plan of a write that only overwrites valid whole blocks in place, or `None` if
    /// the write needs more (a free cluster, a read, a metadata change). Takes nothing.
    pub fn plan_overwrite(&self, id: u64, offset: u64, len: usize) -> Option<WritePlan> {
        // Stops at the first piece that is not an overwrite (before allocating, for one).
        let pieces = pieces(offset, len)
            .map(|(vcluster, start, at, len)| {
                let piece = self.piece_at(id, vcluster, start, at, len);
                piece.is_overwrite().then_some(piece)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(WritePlan { volume: id, pieces })
    }

    /// Plans a write of `len` bytes at `offset` into volume `id` (checked by the caller to lie
    /// within it) and takes the free clusters it needs: all of them, or none and
    /// [`Error::NoSpace`].
    pub fn plan_write(&mut self, id: u64, offset: u64, len: usize) -> Result<WritePlan, Error> {
        let mut plan = WritePlan {
            volume: id,
            pieces: self.pieces_of(id, offset, len),
        };
        for i in 0..plan.pieces.len() {
            let taken = match &mut plan.pieces[i].target {
                Target::InPlace { .. } => continue,
                Target::Fresh { cluster } | Target::CopyOnWrite { to: cluster, .. } => {
                    self.allocate().map(|c| *cluster = c)
                }
            };
            if let Err(e) = taken {
                plan.pieces.truncate(i);
                self.give_back(&plan);
                return Err(e);
            }
        }
        Ok(plan)
    }

    /// Records a carried-out plan: each piece's virtual cluster maps its new entry. A piece
    /// whose virtual cluster changed since the plan stops there ([`Applied::Stale`]).
    pub fn apply_write(&mut self, plan: &WritePlan) -> Result<Applied, Error> {
        for p in &plan.pieces {
            if self.lookup(plan.volume, p.vcluster) != p.old {
                return Ok(Applied::Stale);
            }
            let new = p.new_entry();
            if new != p.old {
                self.set_entry(plan.volume, p.vcluster, new)?;
            }
        }
        Ok(Applied::Done)
    }

    /// Gives back the clusters a plan took that no entry references (all of them if it was
    /// not applied, the rest if it was applied in part). Call once per plan.
    pub fn give_back(&mut self, plan: &WritePlan) {
        for c in plan.pieces.iter().filter_map(WritePiece::taken) {
            self.unallocate(c);
        }
    }

    /// Where the bytes of a read of `len` bytes at `offset` of volume `id` come from, by
    /// spans of the caller's buffer. Spans adjacent in the buffer and in the data area are
    /// merged, also across clusters, so a sequential read is one request.
    pub fn plan_read(&self, id: u64, offset: u64, len: usize) -> Vec<ReadSpan> {
        let bs = BLOCK_SIZE;
        let mut plan: Vec<ReadSpan> = Vec::new();
        for (vc, start, at, in_cluster) in pieces(offset, len) {
            let e = self.lookup(id, vc);
            let mut done = 0;
            while done < in_cluster {
                let p = start + done;
                let n = (bs - p % bs).min(in_cluster - done);
                let source = if e.is_mapped() && e.bitmap & (1 << (p / bs)) != 0 {
                    ReadSource::Data(e.cluster as u64 * CLUSTER_SIZE as u64 + p as u64)
                } else {
                    ReadSource::Zeros
                };
                match plan.last_mut() {
                    Some(last)
                        if last.at + last.len == at + done
                            && match (last.source, source) {
                                (ReadSource::Zeros, ReadSource::Zeros) => true,
                                (ReadSource::Data(x), ReadSource::Data(y)) => {
                                    x + last.len as u64 == y
                                }
                                _ => false,
                            } =>
                    {
                        last.len += n
                    }
                    _ => plan.push(ReadSpan {
                        at: at + done,
                        len: n,
                        source,
                    }),
                }
                done += n;
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = CLUSTER_SIZE as u64;
    const BS: usize = BLOCK_SIZE;

    /// A pool's metadata with one volume, committed (so nothing is pinned).
    fn meta_with_volume() -> (Meta, u64) {
        let mut m = Meta::new(64);
        let v = m.create_volume("v", 1 << 30).unwrap();
        m.committed();
        (m, v)
    }

    /// Plans, "carries out" and applies a write, then commits.
    fn write(m: &mut Meta, id: u64, offset: u64, len: usize) -> WritePlan {
        let plan = m.plan_write(id, offset, len).unwrap();
        assert_eq!(m.apply_write(&plan).unwrap(), Applied::Done);
        m.committed();
        plan
    }

    #[test]
    fn a_first_write_takes_a_fresh_cluster_per_virtual_cluster() {
        let (mut m, v) = meta_with_volume();
        let free = m.free_clusters();
        // 8 KiB straddling two virtual clusters.
        let plan = m.plan_write(v, CS - 4096, 8192).unwrap();
        assert_eq!(plan.pieces.len(), 2);
        assert!(plan.is_fresh_only() && !plan.is_overwrite());
        assert_eq!(m.free_clusters(), free - 2);
        let [a, b] = [plan.pieces[0], plan.pieces[1]];
        assert_eq!(
            (a.vcluster, a.start, a.at, a.len),
            (0, CLUSTER_SIZE - BS, 0, BS)
        );
        assert_eq!((b.vcluster, b.start, b.at, b.len), (1, 0, BS, BS));
        assert!(matches!(a.target, Target::Fresh { .. }));
        assert_eq!(a.reads(), 0);
        assert_eq!(a.new_entry().bitmap, 1 << (SUBCLUSTERS - 1));
        assert_eq!(m.apply_write(&plan).unwrap(), Applied::Done);
        assert_eq!(m.lookup(v, 1), b.new_entry());
    }

    #[test]
    fn an_overwrite_of_valid_blocks_is_in_place_and_changes_nothing() {
        let (mut m, v) = meta_with_volume();
        write(&mut m, v, 0, 2 * BS);
        let plan = m.plan_overwrite(v, 0, BS).expect("an overwrite");
        assert_eq!(plan.pieces[0].new_entry(), plan.pieces[0].old);
        // A block not written yet, or a partial block, needs more than an overwrite.
        assert!(m.plan_overwrite(v, 2 * BS as u64, BS).is_none());
        assert!(m.plan_overwrite(v, 512, 512).is_none());
        let partial = m.plan_write(v, 512, 512).unwrap();
        let p = partial.pieces[0];
        assert_eq!(
            p.target,
            Target::InPlace {
                cluster: p.old.cluster
            }
        );
        assert_eq!((p.partial(), p.reads(), p.buffered()), (1, 1, 1));
    }

    #[test]
    fn a_partial_block_that_held_nothing_is_completed_with_zeros_not_read() {
        let (mut m, v) = meta_with_volume();
        write(&mut m, v, 0, BS);
        // Block 1 of the same cluster, in part: in place, nothing to read.
        let p = m.plan_write(v, BS as u64 + 512, 1024).unwrap().pieces[0];
        assert!(matches!(p.target, Target::InPlace { .. }));
        assert_eq!((p.partial(), p.reads()), (0b10, 0));
        assert_eq!(p.new_entry().bitmap, 0b11);
    }

    #[test]
    fn a_write_to_a_shared_cluster_copies_what_it_does_not_cover() {
        let (mut m, v) = meta_with_volume();
        // Blocks 0..4 valid; then a snapshot shares the cluster.
        write(&mut m, v, 0, 4 * BS);
        m.snapshot("v", "s").unwrap();
        m.committed();
        let shared = m.lookup(v, 0).cluster;
        // Overwrite block 1 whole and block 2 in part.
        let plan = m.plan_write(v, BS as u64, BS + 512).unwrap();
        assert!(!plan.is_overwrite() && !plan.is_fresh_only());
        let p = plan.pieces[0];
        let Target::CopyOnWrite { from, to, keep } = p.target else {
            panic!("expected copy-on-write, got {:?}", p.target);
        };
        assert_eq!(from, shared);
        assert_ne!(to, shared);
        assert_eq!(
            keep, 0b1101,
            "blocks 0, 2 and 3 are kept; block 1 is covered"
        );
        assert_eq!(p.reads(), 0b1101);
        assert_eq!(p.read_from(), shared);
        assert_eq!(p.buffered(), 0b1101);
        assert_eq!(
            p.new_entry(),
            Entry {
                cluster: to,
                bitmap: 0b1111
            }
        );
        assert_eq!(m.apply_write(&plan).unwrap(), Applied::Done);
        let snap = m.id_of("s").unwrap();
        assert_eq!(
            m.lookup(snap, 0).cluster,
            shared,
            "the snapshot keeps its cluster"
        );
        assert_eq!(m.refs(to), 1);
    }

    #[test]
    fn space_freed_in_the_running_transaction_is_not_reused() {
        let (mut m, v) = meta_with_volume();
        write(&mut m, v, 0, BS);
        m.snapshot("v", "s").unwrap();
        m.committed();
        // The volume copies on write; deleting the snapshot then frees its cluster, but only
        // at the next commit.
        write(&mut m, v, 0, BS);
        let old = m.lookup(m.id_of("s").unwrap(), 0).cluster;
        m.delete("s").unwrap();
        let plan = m.plan_write(v, CS, BS).unwrap();
        assert_ne!(plan.pieces[0].cluster(), old);
        // And nothing is overwritten in place until that delete is committed.
        assert!(m.plan_overwrite(v, 0, BS).is_none());
        m.give_back(&plan);
    }

    #[test]
    fn no_space_takes_nothing() {
        let mut m = Meta::new(2);
        let v = m.create_volume("v", 1 << 30).unwrap();
        m.committed();
        assert!(matches!(
            m.plan_write(v, 0, 3 * CLUSTER_SIZE),
            Err(Error::NoSpace)
        ));
        assert_eq!(m.free_clusters(), 2);
        assert_eq!(
            m.plan_write(v, 0, 2 * CLUSTER_SIZE).unwrap().pieces.len(),
            2
        );
        assert_eq!(m.free_clusters(), 0);
    }

    #[test]
    fn a_plan_overtaken_by_another_writer_is_stale_and_gives_its_clusters_back() {
        let (mut m, v) = meta_with_volume();
        let free = m.free_clusters();
        let ours = m.plan_write(v, 0, BS).unwrap();
        // Another writer maps the same virtual cluster first.
        write(&mut m, v, 0, BS);
        assert_eq!(m.apply_write(&ours).unwrap(), Applied::Stale);
        m.give_back(&ours);
        assert_eq!(m.free_clusters(), free - 1);
    }

    #[test]
    fn reads_merge_across_blocks_and_clusters_and_zeros_fill_holes() {
        let (mut m, v) = meta_with_volume();
        // Virtual clusters 0 and 1 written whole: two consecutive fresh clusters? Not
        // necessarily, so check merging against what was mapped.
        write(&mut m, v, 0, 2 * CLUSTER_SIZE);
        let (c0, c1) = (m.lookup(v, 0).cluster, m.lookup(v, 1).cluster);
        let plan = m.plan_read(v, 0, 2 * CLUSTER_SIZE + BS);
        let data0 = ReadSource::Data(c0 as u64 * CS);
        if c1 == c0 + 1 {
            assert_eq!(plan.len(), 2);
            assert_eq!(
                plan[0],
                ReadSpan {
                    at: 0,
                    len: 2 * CLUSTER_SIZE,
                    source: data0
                }
            );
        } else {
            assert_eq!(plan.len(), 3);
            assert_eq!(
                plan[0],
                ReadSpan {
                    at: 0,
                    len: CLUSTER_SIZE,
                    source: data0
                }
            );
        }
        let last = plan.last().unwrap();
        assert_eq!(
            *last,
            ReadSpan {
                at: 2 * CLUSTER_SIZE,
                len: BS,
                source: ReadSource::Zeros
            }
        );
        // A hole inside a cluster.
        m.set_entry(
            v,
            0,
            Entry {
                cluster: c0,
                bitmap: 0b101,
            },
        )
        .unwrap();
        let plan = m.plan_read(v, 0, 3 * BS);
        assert_eq!(
            plan,
            vec![
                ReadSpan {
                    at: 0,
                    len: BS,
                    source: data0
                },
                ReadSpan {
                    at: BS,
                    len: BS,
                    source: ReadSource::Zeros
                },
                ReadSpan {
                    at: 2 * BS,
                    len: BS,
                    source: ReadSource::Data(c0 as u64 * CS + 2 * BS as u64)
                },
            ]
        );
    }

    #[test]
    fn helpers_split_and_run() {
        assert_eq!(
            pieces(CS - 512, 1024 + CLUSTER_SIZE).collect::<Vec<_>>(),
            vec![
                (0, CLUSTER_SIZE - 512, 0, 512),
                (1, 0, 512, CLUSTER_SIZE),
                (2, 0, 512 + CLUSTER_SIZE, 512)
            ]
        );
        assert_eq!(vclusters(CS - 512, 1024), 0..=1);
        assert_eq!(
            runs(0b1011_0001).collect::<Vec<_>>(),
            vec![(0, 1), (4, 6), (7, 8)]
        );
        assert_eq!(runs(u16::MAX).collect::<Vec<_>>(), vec![(0, 16)]);
    }
}
