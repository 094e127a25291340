//! The Internet checksum (RFC 1071) over byte slices, fast enough for every packet.
//!
//! Words are summed in native byte order (the ones'-complement sum is byte-order independent,
//! RFC 1071 §2(B)), 32 bits at a time into four 64-bit accumulators (no carry handling), a loop the compiler turns
//! into wide vector adds; folding happens once at the end. Results are in native order:
//! write them with `to_ne_bytes`. Agrees with `etherparse::checksum` (property-tested).

/// A running ones'-complement sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sum(u64);

impl Sum {
    /// An empty sum.
    pub const fn new() -> Sum {
        Sum(0)
    }

    /// Adds `bytes` as 16-bit words; an odd last byte is padded with a zero byte.
    #[inline]
    pub fn add_bytes(self, bytes: &[u8]) -> Sum {
        // Blocks of 1 GiB keep every accumulator below 2^60: plain u64 adds, no carries.
        let mut sum = self;
        for block in bytes.chunks(1 << 30) {
            sum = sum.add_u64(block_sum(block));
        }
        sum
    }

    /// Adds a fixed-size array (a header): a constant number of 32-bit adds, no loop logic.
    /// `N` must be even.
    #[inline(always)]
    pub fn add_array<const N: usize>(self, bytes: &[u8; N]) -> Sum {
        const { assert!(N.is_multiple_of(2), "add_array takes whole 16-bit words") };
        let mut acc = 0u64;
        let mut i = 0;
        while i + 4 <= N {
            acc += u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as u64;
            i += 4;
        }
        if i < N {
            acc += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        }
        self.add_u64(acc)
    }

    /// Adds one 16-bit word given as its two bytes in wire order.
    #[inline]
    pub fn add_word(self, bytes: [u8; 2]) -> Sum {
        self.add_u64(u16::from_ne_bytes(bytes) as u64)
    }

    #[inline(always)]
    fn add_u64(self, v: u64) -> Sum {
        let (s, carry) = self.0.overflowing_add(v);
        Sum(s + carry as u64)
    }

    /// The 16-bit ones'-complement sum (not yet complemented).
    #[inline]
    pub fn folded(self) -> u16 {
        let mut s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// The checksum field value: the complement of the folded sum. Zero when a received
    /// header including its checksum field is intact.
    #[inline]
    pub fn checksum(self) -> u16 {
        !self.folded()
    }

    /// The UDP checksum field value, where zero means "no checksum" and is sent as 0xffff.
    #[inline]
    pub fn udp_checksum(self) -> u16 {
        match self.checksum() {
            0 => 0xffff,
            c => c,
        }
    }
}

/// Sum of the 16-bit words of at most 1 GiB, unfolded.
#[inline(always)]
fn block_sum(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += u32::from_ne_bytes([c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]]) as u64;
        }
    }
    let mut words = chunks.remainder().chunks_exact(2);
    let mut tail = 0u64;
    for w in &mut words {
        tail += u16::from_ne_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = words.remainder() {
        tail += u16::from_ne_bytes([*last, 0]) as u64;
    }
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::checksum::Sum16BitWords;

    #[test]
    fn matches_rfc_1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(
            u16::from_be_bytes(Sum::new().add_bytes(&bytes).folded().to_ne_bytes()),
            0xddf2
        );
    }

    #[test]
    fn agrees_with_etherparse_on_every_length() {
        let data: Vec<u8> = (0..2100u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            let ours = Sum::new().add_bytes(&data[..len]).checksum();
            let theirs = Sum16BitWords::new()
                .add_slice(&data[..len])
                .ones_complement();
            assert_eq!(ours, theirs, "length {len}");
        }
        let all_ff = vec![0xffu8; 4096];
        assert_eq!(
            Sum::new().add_bytes(&all_ff).checksum(),
            Sum16BitWords::new().add_slice(&all_ff).ones_complement()
        );
    }

    #[test]
    fn fixed_arrays_sum_like_slices() {
        let h: [u8; 20] = core::array::from_fn(|i| (i * 37 + 11) as u8);
        assert_eq!(
            Sum::new().add_array(&h).folded(),
            Sum::new().add_bytes(&h).folded()
        );
        let w: [u8; 6] = [0xff, 0xfe, 1, 2, 3, 4];
        assert_eq!(
            Sum::new().add_array(&w).checksum(),
            Sum::new().add_bytes(&w).checksum()
        );
    }

    #[test]
    fn sums_chain() {
        let a = [1u8, 2, 3, 4, 5, 6];
        let b = [7u8, 8, 9, 10];
        let joined = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(
            Sum::new().add_bytes(&a).add_bytes(&b).checksum(),
            Sum::new().add_bytes(&joined).checksum()
        );
        assert_eq!(
            Sum::new().add_word([0xab, 0xcd]).checksum(),
            Sum::new().add_bytes(&[0xab, 0xcd]).checksum()
        );
    }
}
