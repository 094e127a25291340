use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// The all-zero address, never valid as a source.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Reads a MAC address from the first six bytes of `bytes`, if there are six.
    #[inline]
    pub fn from_slice(bytes: &[u8]) -> Option<MacAddr> {
        bytes.get(..6).and_then(|b| b.try_into().ok()).map(MacAddr)
    }

    /// The address as six bytes.
    #[inline]
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// True for group (multicast and broadcast) addresses: the I/G bit is set.
    #[inline]
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// True for `ff:ff:ff:ff:ff:ff`.
    #[inline]
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// True for individual (unicast) addresses other than all zeros.
    #[inline]
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self != Self::ZERO
    }

    /// True for locally administered addresses (the U/L bit is set).
    #[inline]
    pub const fn is_local(self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The address packed into the low 48 bits of a `u64` (big-endian order).
    #[inline]
    pub const fn to_u64(self) -> u64 {
        let b = self.0;
        let hi = u16::from_be_bytes([b[0], b[1]]) as u64;
        let lo = u32::from_be_bytes([b[2], b[3], b[4], b[5]]) as u64;
        hi << 32 | lo
    }

    /// The inverse of [`MacAddr::to_u64`] (the upper 16 bits are ignored).
    #[inline]
    pub const fn from_u64(v: u64) -> MacAddr {
        let b = v.to_be_bytes();
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

impl std::hash::Hash for MacAddr {
    /// One `u64` write: cheaper than hashing a six-byte slice, same equality.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.to_u64());
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| Error::BadMac(s.to_owned()))?;
            if part.len() != 2 {
                return Err(Error::BadMac(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| Error::BadMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(Error::BadMac(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        MacAddr(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let mac: MacAddr = "02:00:5e:10:00:01".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01]);
        assert_eq!(mac.to_string(), "02:00:5e:10:00:01");
        assert!(mac.is_unicast() && mac.is_local() && !mac.is_multicast());
        assert_eq!(mac.to_u64(), 0x0200_5e10_0001);
        assert_eq!(MacAddr::from_u64(mac.to_u64()), mac);
    }

    #[test]
    fn rejects_bad_strings() {
        for bad in [
            "",
            "02:00:5e:10:00",
            "02:00:5e:10:00:01:02",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn classifies_group_addresses() {
        assert!(MacAddr::BROADCAST.is_broadcast() && MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]).is_multicast());
        assert!(MacAddr([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert!(!MacAddr::ZERO.is_unicast());
    }
}
