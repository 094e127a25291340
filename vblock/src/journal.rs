//! Journal blocks: a transaction's records packed into 4 KiB blocks, the last one flagged
//! commit. Replay takes blocks in sequence while they are valid (magic, pool, epoch, sequence,
//! crc) and applies a transaction only once its commit block is read: a torn or partly
//! written transaction is never applied.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::Error;
use crate::error::Structure;
use crate::format::{BLOCK_SIZE, JOURNAL_COMMIT, JOURNAL_CRC_AT, JOURNAL_MAGIC, JournalHeader};
use crate::meta::{Entry, Kind, Qos, Record};

const HEADER: usize = std::mem::size_of::<JournalHeader>();
/// Record bytes per block.
pub const PAYLOAD: usize = BLOCK_SIZE - HEADER;

fn encode(r: &Record, out: &mut Vec<u8>) {
    let name = |out: &mut Vec<u8>, n: &str| {
        out.push(n.len() as u8);
        out.extend_from_slice(n.as_bytes());
    };
    match r {
        Record::Create { id, size, name: n } => {
            out.push(1);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            name(out, n);
        }
        Record::Derive {
            source,
            id,
            kind,
            name: n,
        } => {
            out.push(2);
            out.extend_from_slice(&source.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
            out.push(match kind {
                Kind::Volume => 0,
                Kind::Snapshot => 1,
            });
            name(out, n);
        }
        Record::Delete { id } => {
            out.push(3);
            out.extend_from_slice(&id.to_le_bytes());
        }
        Record::Resize { id, size } => {
            out.push(4);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        Record::SetQos { id, qos } => {
            out.push(5);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&qos.iops.to_le_bytes());
            out.extend_from_slice(&qos.bps.to_le_bytes());
        }
        Record::SetEntry {
            id,
            vcluster,
            entry,
        } => {
            out.push(6);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&vcluster.to_le_bytes());
            out.extend_from_slice(&entry.cluster.to_le_bytes());
            out.extend_from_slice(&entry.bitmap.to_le_bytes());
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        if self.b.len() < n {
            return Err(Error::corrupt(Structure::Journal, "record truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn name(&mut self) -> Result<String, Error> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::corrupt(Structure::Journal, "volume name is not UTF-8"))
    }
}

fn decode(r: &mut Reader<'_>) -> Result<Record, Error> {
    Ok(match r.u8()? {
        1 => Record::Create {
            id: r.u64()?,
            size: r.u64()?,
            name: r.name()?,
        },
        2 => Record::Derive {
            source: r.u64()?,
            id: r.u64()?,
            kind: match r.u8()? {
                0 => Kind::Volume,
                1 => Kind::Snapshot,
                k => {
                    return Err(Error::corrupt(
                        Structure::Journal,
                        format!("volume kind {k}"),
                    ));
                }
            },
            name: r.name()?,
        },
        3 => Record::Delete { id: r.u64()? },
        4 => Record::Resize {
            id: r.u64()?,
            size: r.u64()?,
        },
        5 => Record::SetQos {
            id: r.u64()?,
            qos: Qos {
                iops: r.u64()?,
                bps: r.u64()?,
            },
        },
        6 => Record::SetEntry {
            id: r.u64()?,
            vcluster: r.u64()?,
            entry: Entry {
                cluster: r.u32()?,
                bitmap: r.u16()?,
            },
        },
        t => {
            return Err(Error::corrupt(
                Structure::Journal,
                format!("record type {t}"),
            ));
        }
    })
}

/// Identity of a journal segment: the pool and the superblock generation that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The pool's uuid.
    pub uuid: [u8; 16],
    /// The epoch (superblock generation).
    pub epoch: u64,
}

/// Packs a transaction into blocks numbered from `seq`; returns the blocks, concatenated.
pub fn encode_txn(records: &[Record], seq: u64, seg: Segment) -> Vec<u8> {
    let mut payloads: Vec<Vec<u8>> = vec![Vec::new()];
    let mut one = Vec::with_capacity(96);
    for r in records {
        one.clear();
        encode(r, &mut one);
        if payloads
            .last()
            .is_some_and(|p| p.len() + one.len() > PAYLOAD)
        {
            payloads.push(Vec::new());
        }
        if let Some(p) = payloads.last_mut() {
            p.extend_from_slice(&one);
        }
    }
    let n = payloads.len();
    let mut out = vec![0u8; n * BLOCK_SIZE];
    for (i, p) in payloads.iter().enumerate() {
        let block = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
        let h = JournalHeader {
            magic: JOURNAL_MAGIC,
            seq: U64::new(seq + i as u64),
            len: U32::new(p.len() as u32),
            flags: U32::new(if i + 1 == n { JOURNAL_COMMIT } else { 0 }),
            uuid: seg.uuid,
            epoch: U64::new(seg.epoch),
            crc: U32::new(0),
            reserved: U32::new(0),
            txn_start: U64::new(seq),
        };
        block[..HEADER].copy_from_slice(h.as_bytes());
        block[HEADER..HEADER + p.len()].copy_from_slice(p);
        let crc = crate::format::block_crc(block, JOURNAL_CRC_AT);
        block[JOURNAL_CRC_AT..JOURNAL_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// A journal block read back: its records and whether it ends a transaction; `None` if it is
/// not the valid block `seq` of this segment (the end of the journal). A valid block whose
/// records do not decode is corruption.
pub fn decode_block(
    block: &[u8],
    seq: u64,
    seg: Segment,
) -> Result<Option<(Vec<Record>, bool)>, Error> {
    let Ok((h, _)) = JournalHeader::read_from_prefix(block) else {
        return Ok(None);
    };
    if h.magic != JOURNAL_MAGIC
        || h.seq.get() != seq
        || h.uuid != seg.uuid
        || h.epoch.get() != seg.epoch
        || h.len.get() as usize > PAYLOAD
        || block.len() != BLOCK_SIZE
        || h.crc.get() != crate::format::block_crc(block, JOURNAL_CRC_AT)
    {
        return Ok(None);
    }
    let mut r = Reader {
        b: &block[HEADER..HEADER + h.len.get() as usize],
    };
    let mut records = Vec::new();
    while !r.b.is_empty() {
        records.push(decode(&mut r)?);
    }
    Ok(Some((records, h.flags.get() & JOURNAL_COMMIT != 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: Segment = Segment {
        uuid: [3; 16],
        epoch: 9,
    };

    fn sample(n: usize) -> Vec<Record> {
        let mut v = vec![
            Record::Create {
                id: 1,
                size: 1 << 30,
                name: "vol".into(),
            },
            Record::Derive {
                source: 1,
                id: 2,
                kind: Kind::Snapshot,
                name: "snap".into(),
            },
            Record::SetQos {
                id: 1,
                qos: Qos { iops: 5, bps: 6 },
            },
            Record::Resize {
                id: 1,
                size: 2 << 30,
            },
        ];
        for i in 0..n {
            v.push(Record::SetEntry {
                id: 1,
                vcluster: i as u64,
                entry: Entry {
                    cluster: i as u32 * 3,
                    bitmap: 0x8001,
                },
            });
        }
        v.push(Record::Delete { id: 2 });
        v
    }

    #[test]
    fn transactions_round_trip_across_blocks() {
        let recs = sample(500);
        let blocks = encode_txn(&recs, 40, SEG);
        assert!(blocks.len() / BLOCK_SIZE >= 3);
        let mut back = Vec::new();
        let mut commits = 0;
        for (i, b) in blocks.chunks(BLOCK_SIZE).enumerate() {
            let (r, commit) = decode_block(b, 40 + i as u64, SEG).unwrap().unwrap();
            back.extend(r);
            commits += commit as usize;
        }
        assert_eq!(back, recs);
        assert_eq!(commits, 1);
    }

    #[test]
    fn stale_foreign_or_damaged_blocks_end_the_journal() {
        let blocks = encode_txn(&sample(3), 7, SEG);
        let b = &blocks[..BLOCK_SIZE];
        assert!(decode_block(b, 8, SEG).unwrap().is_none(), "wrong sequence");
        let other = Segment { epoch: 10, ..SEG };
        assert!(decode_block(b, 7, other).unwrap().is_none(), "older epoch");
        for at in [0, 30, 60, 500, 4095] {
            let mut bad = b.to_vec();
            bad[at] ^= 0x10;
            assert!(
                decode_block(&bad, 7, SEG).unwrap().is_none(),
                "bit flip at {at}"
            );
        }
        assert!(decode_block(&b[..100], 7, SEG).unwrap().is_none(), "short");
    }
}
