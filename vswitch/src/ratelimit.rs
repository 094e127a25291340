//! Token-bucket policing in bits per second and packets per second.

use crate::{Error, Nanos};

/// A rate limit; either part may be absent (unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// Sustained bits per second, with a burst of `burst_bits`.
    pub bits_per_sec: Option<u64>,
    /// Burst size in bits (default: 1/10 s of traffic, at least 64 KiB).
    pub burst_bits: Option<u64>,
    /// Sustained packets per second, with a burst of `burst_packets`.
    pub packets_per_sec: Option<u64>,
    /// Burst size in packets (default: 1/10 s of packets, at least 32: one datapath burst).
    pub burst_packets: Option<u64>,
}

/// One bucket: capacity and rate in "units" (bits or packets), tokens kept in units × 1e9
/// so that refills at nanosecond resolution lose nothing to rounding.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    rate: u64,
    capacity_nano: u128,
    tokens_nano: u128,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        let capacity_nano = burst as u128 * 1_000_000_000;
        Bucket {
            rate,
            capacity_nano,
            tokens_nano: capacity_nano,
        }
    }

    #[inline]
    fn refill(&mut self, elapsed_ns: u64) {
        let added = self.rate as u128 * elapsed_ns as u128;
        self.tokens_nano = (self.tokens_nano + added).min(self.capacity_nano);
    }

    #[inline]
    fn has(&self, units: u64) -> bool {
        self.tokens_nano >= units as u128 * 1_000_000_000
    }

    #[inline]
    fn take(&mut self, units: u64) {
        self.tokens_nano -= units as u128 * 1_000_000_000;
    }
}

/// A policer: a frame conforms if both buckets hold enough tokens; non-conforming frames take
/// no tokens (they are dropped).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    bits: Option<Bucket>,
    packets: Option<Bucket>,
    last: Option<Nanos>,
}

impl TokenBucket {
    /// A policer for `limit`. Fails on zero rates or bursts.
    pub fn new(limit: &RateLimit) -> Result<TokenBucket, Error> {
        let bits = match limit.bits_per_sec {
            None => None,
            Some(0) => return Err(Error::invalid("rate limit", "bits_per_sec must be > 0")),
            Some(rate) => {
                let burst = limit.burst_bits.unwrap_or((rate / 10).max(64 * 1024 * 8));
                if burst == 0 {
                    return Err(Error::invalid("rate limit", "burst_bits must be > 0"));
                }
                Some(Bucket::new(rate, burst))
            }
        };
        let packets = match limit.packets_per_sec {
            None => None,
            Some(0) => return Err(Error::invalid("rate limit", "packets_per_sec must be > 0")),
            Some(rate) => {
                let burst = limit.burst_packets.unwrap_or((rate / 10).max(32));
                if burst == 0 {
                    return Err(Error::invalid("rate limit", "burst_packets must be > 0"));
                }
                Some(Bucket::new(rate, burst))
            }
        };
        Ok(TokenBucket {
            bits,
            packets,
            last: None,
        })
    }

    /// True if no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.bits.is_none() && self.packets.is_none()
    }

    /// Whether a frame of `bytes` conforms at `now`; if so its tokens are taken.
    #[inline]
    pub fn conform(&mut self, now: Nanos, bytes: usize) -> bool {
        if self.is_unlimited() {
            return true;
        }
        let elapsed = self.last.map_or(0, |t| now.saturating_sub(t));
        self.last = Some(now.max(self.last.unwrap_or(0)));
        let bits = bytes as u64 * 8;
        if let Some(b) = &mut self.bits {
            b.refill(elapsed);
        }
        if let Some(p) = &mut self.packets {
            p.refill(elapsed);
        }
        let ok = self.bits.as_ref().is_none_or(|b| b.has(bits))
            && self.packets.as_ref().is_none_or(|p| p.has(1));
        if ok {
            if let Some(b) = &mut self.bits {
                b.take(bits);
            }
            if let Some(p) = &mut self.packets {
                p.take(1);
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// Offers `offered_pps` frames of `bytes` for `secs` and returns how many conform.
    fn run(tb: &mut TokenBucket, offered_pps: u64, bytes: usize, secs: u64) -> u64 {
        let gap = SEC / offered_pps;
        (0..offered_pps * secs)
            .filter(|i| tb.conform(i * gap, bytes))
            .count() as u64
    }

    #[test]
    fn bit_rate_holds_within_one_burst() {
        let limit = RateLimit {
            bits_per_sec: Some(10_000_000),
            burst_bits: Some(100_000),
            ..Default::default()
        };
        let mut tb = TokenBucket::new(&limit).unwrap();
        // Offer 100 Mbit/s of 1250-byte frames (10k pps) for 10 s against 10 Mbit/s.
        let passed = run(&mut tb, 10_000, 1250, 10);
        let expected = 10 * 10_000_000 / (1250 * 8) + 100_000 / (1250 * 8);
        assert!(passed.abs_diff(expected) <= 1, "{passed} vs {expected}");
    }

    #[test]
    fn packet_rate_holds() {
        let limit = RateLimit {
            packets_per_sec: Some(1000),
            burst_packets: Some(32),
            ..Default::default()
        };
        let mut tb = TokenBucket::new(&limit).unwrap();
        let passed = run(&mut tb, 50_000, 64, 5);
        assert!(passed.abs_diff(5 * 1000 + 32) <= 1, "{passed}");
    }

    #[test]
    fn traffic_below_the_limit_all_passes() {
        let limit = RateLimit {
            bits_per_sec: Some(8_000_000),
            packets_per_sec: Some(10_000),
            ..Default::default()
        };
        let mut tb = TokenBucket::new(&limit).unwrap();
        assert_eq!(run(&mut tb, 500, 1000, 3), 1500);
    }

    #[test]
    fn zero_rates_are_rejected_and_none_is_unlimited() {
        for bad in [
            RateLimit {
                bits_per_sec: Some(0),
                ..Default::default()
            },
            RateLimit {
                packets_per_sec: Some(10),
                burst_packets: Some(0),
                ..Default::default()
            },
        ] {
            assert!(TokenBucket::new(&bad).is_err());
        }
        let mut open = TokenBucket::new(&RateLimit::default()).unwrap();
        assert!(open.is_unlimited());
        assert!((0..10_000).all(|i| open.conform(i, 9000)));
    }

    #[test]
    fn a_clock_going_backwards_adds_no_tokens() {
        let limit = RateLimit {
            packets_per_sec: Some(10),
            burst_packets: Some(1),
            ..Default::default()
        };
        let mut tb = TokenBucket::new(&limit).unwrap();
        assert!(tb.conform(10 * SEC, 64));
        assert!(!tb.conform(5 * SEC, 64));
        assert!(!tb.conform(10 * SEC, 64));
        assert!(tb.conform(10 * SEC + SEC / 10, 64));
    }
}
