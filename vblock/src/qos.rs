//! Per-volume I/O limits: token buckets in requests/s and bytes/s that delay (never fail)
//! requests over the limit. Sans-IO: [`Limiter::admit`] says how long a request must wait.

use std::time::Duration;

use crate::meta::Qos;

/// One bucket whose tokens may go negative: a request over the limit takes its tokens now
/// and waits until the bucket has refilled to zero (a shaper, as for a disk queue).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    rate: u64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
        }
    }

    fn admit(&mut self, elapsed: f64, cost: f64) -> f64 {
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst) - cost;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate as f64
        }
    }
}

/// A volume's limiter.
#[derive(Clone, Debug)]
pub struct Limiter {
    qos: Qos,
    iops: Option<Bucket>,
    bps: Option<Bucket>,
    last: Option<Duration>,
}

impl Limiter {
    /// A limiter for `qos` (0 = unlimited). Bursts: 1/10 s of the rate, at least one request
    /// and 128 KiB.
    pub fn new(qos: Qos) -> Limiter {
        let iops = (qos.iops > 0).then(|| Bucket::new(qos.iops, (qos.iops as f64 / 10.0).max(1.0)));
        let bps = (qos.bps > 0)
            .then(|| Bucket::new(qos.bps, (qos.bps as f64 / 10.0).max(128.0 * 1024.0)));
        Limiter {
            qos,
            iops,
            bps,
            last: None,
        }
    }

    /// The limits it enforces.
    pub fn qos(&self) -> Qos {
        self.qos
    }

    /// Accounts a request of `bytes` at time `now` (any monotonic clock) and returns how long
    /// it must wait before it may start.
    pub fn admit(&mut self, now: Duration, bytes: u64) -> Duration {
        let elapsed = self
            .last
            .map_or(0.0, |l| now.saturating_sub(l).as_secs_f64());
        self.last = Some(now);
        let a = self.iops.as_mut().map_or(0.0, |b| b.admit(elapsed, 1.0));
        let b = self
            .bps
            .as_mut()
            .map_or(0.0, |b| b.admit(elapsed, bytes as f64));
        Duration::from_secs_f64(a.max(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issues requests back to back, each starting when the limiter allows: the achieved rate
    /// over many requests is the limit.
    fn achieved(qos: Qos, bytes: u64, n: u32) -> (f64, f64) {
        let mut l = Limiter::new(qos);
        let mut now = Duration::ZERO;
        for _ in 0..n {
            now += l.admit(now, bytes);
        }
        let secs = now.as_secs_f64();
        (n as f64 / secs, n as f64 * bytes as f64 / secs)
    }

    #[test]
    fn sustained_rates_match_the_limits() {
        let (iops, _) = achieved(Qos { iops: 1000, bps: 0 }, 4096, 20_000);
        assert!((iops / 1000.0 - 1.0).abs() < 0.02, "{iops}");
        let (_, bps) = achieved(
            Qos {
                iops: 0,
                bps: 10 << 20,
            },
            1 << 20,
            2000,
        );
        assert!((bps / (10 << 20) as f64 - 1.0).abs() < 0.02, "{bps}");
        // The tighter limit wins.
        let (iops, _) = achieved(
            Qos {
                iops: 100,
                bps: 1 << 30,
            },
            4096,
            2000,
        );
        assert!((iops / 100.0 - 1.0).abs() < 0.02, "{iops}");
    }

    #[test]
    fn unlimited_never_waits_and_bursts_pass_at_once() {
        let mut l = Limiter::new(Qos::default());
        assert_eq!(l.admit(Duration::ZERO, 1 << 30), Duration::ZERO);
        let mut l = Limiter::new(Qos { iops: 100, bps: 0 });
        for _ in 0..10 {
            assert_eq!(l.admit(Duration::ZERO, 4096), Duration::ZERO);
        }
        assert!(l.admit(Duration::ZERO, 4096) > Duration::ZERO);
    }
}
