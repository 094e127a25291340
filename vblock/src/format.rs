//! The on-disk format, version 1 (described in `docs/format.md`): fixed-size little-endian
//! structures, each 4 KiB block carrying its own crc32.
//!
//! Layout of a pool, in 4 KiB blocks:
//!
//! | blocks | content |
//! |---|---|
//! | 0, 1 | superblock slots (the valid one with the highest generation wins) |
//! | `journal_start ..` | the journal ring (`journal_blocks`) |
//! | `ckpt_start[0] ..`, `ckpt_start[1] ..` | two checkpoint areas (`ckpt_blocks` each) |
//! | `data_start ..` | data clusters (`CLUSTER_SIZE` each) |

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a metadata block and of a data subcluster.
pub const BLOCK_SIZE: usize = 4096;
/// Size of a data cluster, the unit of allocation.
pub const CLUSTER_SIZE: usize = 64 * 1024;
/// Subclusters per cluster: a first 4 KiB write into thin space writes 4 KiB, not 64.
pub const SUBCLUSTERS: usize = CLUSTER_SIZE / BLOCK_SIZE;
/// Entries per mapping-tree node.
pub const FANOUT: usize = 512;
/// Levels of the mapping tree (root, middle, leaf).
pub const LEVELS: u32 = 3;
/// Largest number of clusters a volume can map (8 TiB of virtual size).
pub const MAX_VOLUME_CLUSTERS: u64 = (FANOUT as u64).pow(LEVELS);
/// Longest volume name, in bytes.
pub const NAME_LEN: usize = 64;
/// Format version written and understood.
pub const VERSION: u32 = 1;

/// Magic of a superblock.
pub const SUPER_MAGIC: [u8; 8] = *b"VBLKPOOL";
/// Magic of a journal block.
pub const JOURNAL_MAGIC: [u8; 8] = *b"VBLKJRNL";
/// Magic of a checkpoint block.
pub const CKPT_MAGIC: [u8; 8] = *b"VBLKCKPT";

/// The superblock: geometry, the active checkpoint and where the journal resumes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Superblock {
    /// [`SUPER_MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: U32,
    /// Size of blocks ([`BLOCK_SIZE`]).
    pub block_size: U32,
    /// Size of clusters ([`CLUSTER_SIZE`]).
    pub cluster_size: U32,
    /// Reserved, zero.
    pub reserved0: U32,
    /// Incremented on every superblock write.
    pub generation: U64,
    /// Random identity of the pool.
    pub uuid: [u8; 16],
    /// First block of the journal ring.
    pub journal_start: U64,
    /// Blocks in the journal ring.
    pub journal_blocks: U64,
    /// First block of each checkpoint area.
    pub ckpt_start: [U64; 2],
    /// Blocks in each checkpoint area.
    pub ckpt_blocks: U64,
    /// First block of the data clusters (cluster-aligned).
    pub data_start: U64,
    /// Number of data clusters.
    pub data_clusters: U64,
    /// Which checkpoint area holds the active checkpoint (0 or 1).
    pub active_ckpt: U32,
    /// Reserved, zero.
    pub reserved1: U32,
    /// Generation of the active checkpoint (its blocks carry it).
    pub ckpt_generation: U64,
    /// Blocks the active checkpoint uses.
    pub ckpt_used: U64,
    /// Sequence number of the first journal block to replay on top of the checkpoint.
    pub journal_seq: U64,
    /// crc32 of the structure up to this field.
    pub crc: U32,
}

/// Header of every checkpoint block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CkptHeader {
    /// [`CKPT_MAGIC`].
    pub magic: [u8; 8],
    /// The checkpoint's generation (from the superblock that points at it).
    pub generation: U64,
    /// Index of this block inside the checkpoint.
    pub index: U64,
    /// What the block holds: [`CKPT_KIND_HEAD`], [`CKPT_KIND_NODE`], [`CKPT_KIND_VOLUMES`].
    pub kind: U16,
    /// For nodes: level (0 = leaf). For volume blocks: number of records.
    pub level_or_count: U16,
    /// crc32 of the whole block with this field zero.
    pub crc: U32,
}

/// Checkpoint block kinds.
pub const CKPT_KIND_HEAD: u16 = 1;
/// A mapping-tree node.
pub const CKPT_KIND_NODE: u16 = 2;
/// A block of volume records.
pub const CKPT_KIND_VOLUMES: u16 = 3;

/// Payload of the first checkpoint block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CkptHead {
    /// Blocks holding tree nodes (they follow this one).
    pub node_blocks: U64,
    /// Blocks holding volume records (they follow the nodes).
    pub volume_blocks: U64,
    /// Volumes in all.
    pub volumes: U64,
    /// Next volume id to hand out.
    pub next_volume_id: U64,
}

/// A leaf entry: where a virtual cluster lives and which of its subclusters hold data.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LeafEntry {
    /// Data cluster index plus one (0: not mapped).
    pub cluster_plus_one: U32,
    /// Bit i set: subcluster i holds data; clear: reads as zeros.
    pub bitmap: U16,
}

/// Size of one volume record in a checkpoint.
pub const VOLUME_RECORD_LEN: usize = 128;
/// Volume records per checkpoint block.
pub const VOLUMES_PER_BLOCK: usize =
    (BLOCK_SIZE - std::mem::size_of::<CkptHeader>()) / VOLUME_RECORD_LEN;

/// A volume, snapshot or clone in a checkpoint.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VolumeRecord {
    /// Volume id (never reused).
    pub id: U64,
    /// Id of the volume or snapshot it was made from (0: none).
    pub parent: U64,
    /// Virtual size in bytes.
    pub size: U64,
    /// Checkpoint block index of its root node (0: empty).
    pub root_block: U64,
    /// IOPS limit (0: none).
    pub iops_limit: U64,
    /// Bandwidth limit in bytes/s (0: none).
    pub bps_limit: U64,
    /// 0: volume (writable), 1: snapshot (read-only).
    pub kind: U32,
    /// Length of the name.
    pub name_len: U32,
    /// Name, UTF-8, zero-padded.
    pub name: [u8; NAME_LEN],
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

/// Header of a journal block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct JournalHeader {
    /// [`JOURNAL_MAGIC`].
    pub magic: [u8; 8],
    /// Sequence number; block `seq` lives at ring position `seq % journal_blocks`.
    pub seq: U64,
    /// Bytes of records in the block.
    pub len: U32,
    /// [`JOURNAL_COMMIT`] on the last block of a transaction.
    pub flags: U32,
    /// Random identity of the pool (a block from another pool never replays).
    pub uuid: [u8; 16],
    /// Generation of the superblock that started this journal segment: blocks left over from
    /// an earlier segment (e.g. of a transaction cut by a crash) never replay.
    pub epoch: U64,
    /// crc32 of the whole block with this field zero.
    pub crc: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Sequence number of the transaction's first block: a valid block of a later
    /// transaction proves every earlier one was complete and durable.
    pub txn_start: U64,
}

/// Flag of the last block of a transaction.
pub const JOURNAL_COMMIT: u32 = 1;

/// crc32 of a block whose crc field (at `crc_at`, 4 bytes) is taken as zero.
pub fn block_crc(block: &[u8], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block[..crc_at]);
    h.update(&[0u8; 4]);
    h.update(&block[crc_at + 4..]);
    h.finalize()
}

/// Offset of the crc field in a checkpoint block.
pub const CKPT_CRC_AT: usize = std::mem::offset_of!(CkptHeader, crc);
/// Offset of the crc field in a journal block.
pub const JOURNAL_CRC_AT: usize = std::mem::offset_of!(JournalHeader, crc);
/// Offset of the crc field in a superblock.
pub const SUPER_CRC_AT: usize = std::mem::offset_of!(Superblock, crc);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_their_documented_sizes() {
        assert_eq!(std::mem::size_of::<Superblock>(), 140);
        assert_eq!(std::mem::size_of::<CkptHeader>(), 32);
        assert_eq!(std::mem::size_of::<LeafEntry>(), 6);
        assert_eq!(std::mem::size_of::<VolumeRecord>(), VOLUME_RECORD_LEN);
        assert_eq!(std::mem::size_of::<JournalHeader>(), 64);
        // A node fits a block: 512 leaf entries or 512 child pointers after the header.
        const { assert!(32 + FANOUT * 6 <= BLOCK_SIZE) };
        const { assert!(32 + FANOUT * 4 <= BLOCK_SIZE) };
        assert_eq!(VOLUMES_PER_BLOCK, 31);
    }

    #[test]
    fn block_crc_ignores_only_its_own_field() {
        let mut b = vec![7u8; BLOCK_SIZE];
        let c = block_crc(&b, 20);
        b[20] = 1;
        assert_eq!(block_crc(&b, 20), c);
        b[19] = 1;
        assert_ne!(block_crc(&b, 20), c);
    }
}
