//! Checkpoints: a full image of the metadata, one structure per 4 KiB block, each with its
//! own crc. Block 0 is the head; tree nodes follow in post-order (children before parents,
//! each shared node once, so sharing survives a reopen); volume records come last.

use std::collections::HashMap;
use std::sync::Arc;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::Error;
use crate::error::Structure;
use crate::format::{
    BLOCK_SIZE, CKPT_CRC_AT, CKPT_KIND_HEAD, CKPT_KIND_NODE, CKPT_KIND_VOLUMES, CKPT_MAGIC,
    CkptHead, CkptHeader, FANOUT, LEVELS, LeafEntry, NAME_LEN, VOLUME_RECORD_LEN,
    VOLUMES_PER_BLOCK, VolumeRecord,
};
use crate::meta::{Entry, Kind, Meta, Node, Qos, Volume};

const HEADER: usize = std::mem::size_of::<CkptHeader>();

fn seal(block: &mut [u8], generation: u64, index: u64, kind: u16, level_or_count: u16) {
    let h = CkptHeader {
        magic: CKPT_MAGIC,
        generation: U64::new(generation),
        index: U64::new(index),
        kind: U16::new(kind),
        level_or_count: U16::new(level_or_count),
        crc: U32::new(0),
    };
    block[..HEADER].copy_from_slice(h.as_bytes());
    let crc = crate::format::block_crc(block, CKPT_CRC_AT);
    block[CKPT_CRC_AT..CKPT_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Serialises the metadata as checkpoint blocks of `generation`.
pub fn write(meta: &Meta, generation: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_SIZE];
    let mut index: HashMap<*const Node, u64> = HashMap::new();
    let mut next = 1u64;
    fn emit(
        node: &Arc<Node>,
        level: u32,
        out: &mut Vec<u8>,
        index: &mut HashMap<*const Node, u64>,
        next: &mut u64,
        generation: u64,
    ) -> u64 {
        if let Some(i) = index.get(&Arc::as_ptr(node)) {
            return *i;
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        match &**node {
            Node::Leaf(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let le = LeafEntry {
                        cluster_plus_one: U32::new(if e.is_mapped() { e.cluster + 1 } else { 0 }),
                        bitmap: U16::new(e.bitmap),
                    };
                    let at = HEADER + i * 6;
                    block[at..at + 6].copy_from_slice(le.as_bytes());
                }
            }
            Node::Inner(children) => {
                for (i, c) in children.iter().enumerate() {
                    if let Some(c) = c {
                        let ci = emit(c, level - 1, out, index, next, generation);
                        let at = HEADER + i * 4;
                        block[at..at + 4].copy_from_slice(&(ci as u32).to_le_bytes());
                    }
                }
            }
        }
        let me = *next;
        *next += 1;
        seal(&mut block, generation, me, CKPT_KIND_NODE, level as u16);
        out.extend_from_slice(&block);
        index.insert(Arc::as_ptr(node), me);
        me
    }
    let mut records = Vec::new();
    for v in meta.volumes() {
        let root_block = v.root.as_ref().map_or(0, |r| {
            emit(r, LEVELS - 1, &mut out, &mut index, &mut next, generation)
        });
        let mut name = [0u8; NAME_LEN];
        name[..v.name.len()].copy_from_slice(v.name.as_bytes());
        records.push(VolumeRecord {
            id: U64::new(v.id),
            parent: U64::new(v.parent),
            size: U64::new(v.size),
            root_block: U64::new(root_block),
            iops_limit: U64::new(v.qos.iops),
            bps_limit: U64::new(v.qos.bps),
            kind: U32::new(match v.kind {
                Kind::Volume => 0,
                Kind::Snapshot => 1,
            }),
            name_len: U32::new(v.name.len() as u32),
            name,
            reserved: [0; 8],
        });
    }
    let node_blocks = next - 1;
    let volume_blocks = records.len().div_ceil(VOLUMES_PER_BLOCK) as u64;
    for chunk in records.chunks(VOLUMES_PER_BLOCK) {
        let mut block = vec![0u8; BLOCK_SIZE];
        for (i, r) in chunk.iter().enumerate() {
            let at = HEADER + i * VOLUME_RECORD_LEN;
            block[at..at + VOLUME_RECORD_LEN].copy_from_slice(r.as_bytes());
        }
        seal(
            &mut block,
            generation,
            next,
            CKPT_KIND_VOLUMES,
            chunk.len() as u16,
        );
        next += 1;
        out.extend_from_slice(&block);
    }
    let head = CkptHead {
        node_blocks: U64::new(node_blocks),
        volume_blocks: U64::new(volume_blocks),
        volumes: U64::new(records.len() as u64),
        next_volume_id: U64::new(meta.next_id()),
    };
    out[HEADER..HEADER + std::mem::size_of::<CkptHead>()].copy_from_slice(head.as_bytes());
    seal(&mut out[..BLOCK_SIZE], generation, 0, CKPT_KIND_HEAD, 0);
    out
}

fn what(kind: u16) -> &'static str {
    match kind {
        CKPT_KIND_HEAD => "head",
        CKPT_KIND_NODE => "tree node",
        _ => "volume table",
    }
}

/// Checks block `index` of a checkpoint and returns its header.
fn open_block(data: &[u8], index: u64, generation: u64, kind: u16) -> Result<CkptHeader, Error> {
    let at = index as usize * BLOCK_SIZE;
    let block = data.get(at..at + BLOCK_SIZE).ok_or_else(|| {
        Error::corrupt_at(
            Structure::Checkpoint,
            index * BLOCK_SIZE as u64,
            format!("{} block {index}: missing", what(kind)),
        )
    })?;
    let bad = |why: &str| {
        Error::corrupt_at(
            Structure::Checkpoint,
            index * BLOCK_SIZE as u64,
            format!("{} block {index}: {why}", what(kind)),
        )
    };
    let (h, _) = CkptHeader::read_from_prefix(block).map_err(|_| bad("short"))?;
    if h.magic != CKPT_MAGIC {
        return Err(bad("bad magic"));
    }
    if h.crc.get() != crate::format::block_crc(block, CKPT_CRC_AT) {
        return Err(bad("checksum mismatch"));
    }
    if h.generation.get() != generation || h.index.get() != index || h.kind.get() != kind {
        return Err(bad("belongs to another checkpoint or position"));
    }
    Ok(h)
}

/// Rebuilds the metadata from checkpoint blocks (`data`, `used` blocks of `generation`).
pub fn load(data: &[u8], generation: u64, clusters: u32) -> Result<Meta, Error> {
    open_block(data, 0, generation, CKPT_KIND_HEAD)?;
    let (head, _) = CkptHead::read_from_prefix(&data[HEADER..])
        .map_err(|_| Error::corrupt_at(Structure::Checkpoint, 0, "head: short"))?;
    let node_blocks = head.node_blocks.get();
    let volume_blocks = head.volume_blocks.get();
    // Checked: the counts come from disk, and a wrapped sum would pass the bound.
    let blocks = node_blocks
        .checked_add(volume_blocks)
        .and_then(|n| n.checked_add(1))
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| n.checked_mul(BLOCK_SIZE));
    if blocks.is_none_or(|b| b > data.len()) {
        return Err(Error::corrupt_at(
            Structure::Checkpoint,
            0,
            "head: sizes beyond the area",
        ));
    }
    let mut nodes: Vec<Option<(u32, Arc<Node>)>> = vec![None; node_blocks as usize + 1];
    for i in 1..=node_blocks {
        let h = open_block(data, i, generation, CKPT_KIND_NODE)?;
        let level = h.level_or_count.get() as u32;
        let body = &data[i as usize * BLOCK_SIZE + HEADER..(i as usize + 1) * BLOCK_SIZE];
        let node = if level == 0 {
            let mut entries = Box::new([Entry::default(); FANOUT]);
            for (j, e) in entries.iter_mut().enumerate() {
                let (le, _) = LeafEntry::read_from_prefix(&body[j * 6..]).map_err(|_| {
                    Error::corrupt_at(
                        Structure::Checkpoint,
                        i * BLOCK_SIZE as u64,
                        format!("node {i}: short"),
                    )
                })?;
                let c = le.cluster_plus_one.get();
                if c != 0 {
                    if c > clusters {
                        return Err(Error::corrupt_at(
                            Structure::Checkpoint,
                            i * BLOCK_SIZE as u64,
                            format!("node {i}: maps cluster {} beyond the pool", c - 1),
                        ));
                    }
                    *e = Entry {
                        cluster: c - 1,
                        bitmap: le.bitmap.get(),
                    };
                }
            }
            Node::Leaf(entries)
        } else if level < LEVELS {
            let mut children: Box<[Option<Arc<Node>>; FANOUT]> =
                Box::new(std::array::from_fn(|_| None));
            for (j, slot) in children.iter_mut().enumerate() {
                let at = j * 4;
                let ci = u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                if ci == 0 {
                    continue;
                }
                match nodes.get(ci as usize).and_then(|n| n.as_ref()) {
                    Some((l, n)) if ci < i as u32 && *l + 1 == level => *slot = Some(n.clone()),
                    _ => {
                        return Err(Error::corrupt_at(
                            Structure::Checkpoint,
                            i * BLOCK_SIZE as u64,
                            format!("node {i}: bad child reference {ci}"),
                        ));
                    }
                }
            }
            Node::Inner(children)
        } else {
            return Err(Error::corrupt_at(
                Structure::Checkpoint,
                i * BLOCK_SIZE as u64,
                format!("node {i}: level {level}"),
            ));
        };
        nodes[i as usize] = Some((level, Arc::new(node)));
    }
    let mut volumes = Vec::new();
    for b in 0..volume_blocks {
        let index = 1 + node_blocks + b;
        let h = open_block(data, index, generation, CKPT_KIND_VOLUMES)?;
        let count = h.level_or_count.get() as usize;
        if count > VOLUMES_PER_BLOCK {
            return Err(Error::corrupt_at(
                Structure::Checkpoint,
                index * BLOCK_SIZE as u64,
                format!("volume block {index}: count"),
            ));
        }
        let body = &data[index as usize * BLOCK_SIZE + HEADER..];
        for j in 0..count {
            let (r, _) =
                VolumeRecord::read_from_prefix(&body[j * VOLUME_RECORD_LEN..]).map_err(|_| {
                    Error::corrupt_at(
                        Structure::Checkpoint,
                        index * BLOCK_SIZE as u64,
                        "volume record: short",
                    )
                })?;
            let bad = |why: &str| {
                Error::corrupt_at(
                    Structure::Checkpoint,
                    index * BLOCK_SIZE as u64,
                    format!("volume {}: {why}", r.id.get()),
                )
            };
            let len = r.name_len.get() as usize;
            let name = std::str::from_utf8(r.name.get(..len).ok_or_else(|| bad("name length"))?)
                .map_err(|_| bad("name is not UTF-8"))?
                .to_owned();
            let root = match r.root_block.get() {
                0 => None,
                rb => match nodes.get(rb as usize).and_then(|n| n.as_ref()) {
                    Some((l, n)) if *l == LEVELS - 1 => Some(n.clone()),
                    _ => return Err(bad("bad root reference")),
                },
            };
            volumes.push(Volume {
                id: r.id.get(),
                name,
                kind: match r.kind.get() {
                    0 => Kind::Volume,
                    1 => Kind::Snapshot,
                    _ => return Err(bad("unknown kind")),
                },
                parent: r.parent.get(),
                size: r.size.get(),
                qos: Qos {
                    iops: r.iops_limit.get(),
                    bps: r.bps_limit.get(),
                },
                root,
            });
        }
    }
    drop(nodes);
    Meta::from_volumes(clusters, volumes, head.next_volume_id.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Meta;

    /// Found by the `checkpoint` fuzz target: block counts whose sum wraps passed the bound
    /// and asked for an allocation of 2^61 entries.
    #[test]
    fn block_counts_that_wrap_are_corruption_not_an_allocation() {
        let mut meta = Meta::new(64);
        meta.create_volume("v", 1 << 20).unwrap();
        let mut data = write(&meta, 2);
        assert!(load(&data, 2, 64).is_ok());
        for (nodes, volumes) in [
            (1u64 << 61, u64::MAX - (1 << 61)),
            (u64::MAX, 1),
            (1 << 40, 0),
        ] {
            let head = CkptHead {
                node_blocks: U64::new(nodes),
                volume_blocks: U64::new(volumes),
                volumes: U64::new(1),
                next_volume_id: U64::new(2),
            };
            data[HEADER..HEADER + std::mem::size_of::<CkptHead>()].copy_from_slice(head.as_bytes());
            seal(&mut data[..BLOCK_SIZE], 2, 0, CKPT_KIND_HEAD, 0);
            assert!(
                matches!(load(&data, 2, 64), Err(Error::Corrupt(_))),
                "{nodes} + {volumes}"
            );
        }
    }
}
