//! A pool's watch over its space, in the manner of dm-thin: what a write that needs new space
//! does when there is none (fail at once, or wait for space up to a timeout), the low-water
//! event raised when free space drops below a mark, and the counters and log lines of both.
//! The pool tells it when space may have appeared (a commit, a growth, a delete).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a write that needs new space does when the pool has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Fails at once with ENOSPC (the default).
    #[default]
    Error,
    /// Waits for space — the pool grown, a volume deleted, freed space committed — for up to
    /// this long, then fails with ENOSPC.
    Queue(Duration),
}

/// A pool's space and its events, as reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceReport {
    /// Data clusters in all.
    pub clusters: u64,
    /// Clusters holding data of some volume.
    pub used: u64,
    /// Clusters freed (discard, zeroes, copy-on-write, delete) by changes not yet committed:
    /// free after the next commit.
    pub pending_free: u64,
    /// Clusters free now.
    pub free: u64,
    /// The low-water mark, in clusters (0: none).
    pub low_water: u64,
    /// Free space is below the low-water mark.
    pub below_low_water: bool,
    /// Times free space dropped below the low-water mark.
    pub low_water_events: u64,
    /// Writes that found the pool full and waited for space.
    pub queued_writes: u64,
    /// Writes that failed because the pool was full (at once, or after waiting).
    pub refused_writes: u64,
}

/// The watch (one per pool).
#[derive(Debug, Default)]
pub struct SpaceWatch {
    when_full: Mutex<WhenFull>,
    low_water: AtomicU64,
    below: AtomicBool,
    low_water_events: AtomicU64,
    queued: AtomicU64,
    refused: AtomicU64,
    refused_logged: Mutex<Option<Instant>>,
    queued_logged: Mutex<Option<Instant>>,
    /// Counts [`Self::space_changed`]; read without a lock on every write, changed under
    /// `waiters` (so a waiter cannot miss a change between looking and sleeping).
    generation: AtomicU64,
    waiters: Mutex<()>,
    changed: Condvar,
}

/// True at most once a minute per `at` (one log line per episode, not per write).
fn once_a_minute(at: &Mutex<Option<Instant>>) -> bool {
    let mut at = at.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(60)) {
        *at = Some(now);
        true
    } else {
        false
    }
}

impl SpaceWatch {
    /// The policy for writes into a full pool.
    pub fn when_full(&self) -> WhenFull {
        *self.when_full.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets it (live: writes waiting now keep the timeout they started with).
    pub fn set_when_full(&self, policy: WhenFull) {
        *self.when_full.lock().unwrap_or_else(|p| p.into_inner()) = policy;
        self.space_changed(); // writers waiting under `Queue` look again
    }

    /// The low-water mark in clusters (0: none).
    pub fn low_water(&self) -> u64 {
        self.low_water.load(Ordering::Relaxed)
    }

    /// Sets the low-water mark in clusters (0: none).
    pub fn set_low_water(&self, clusters: u64) {
        self.low_water.store(clusters, Ordering::Relaxed);
        if clusters == 0 {
            self.below.store(false, Ordering::Relaxed);
        }
    }

    /// Where free space stands against the low-water mark: crossing it downwards is an event
    /// (counted, logged), crossing back up is logged.
    pub fn observe_free(&self, free: u64, clusters: u64) {
        let mark = self.low_water();
        if mark == 0 {
            return;
        }
        let below = free < mark;
        if self.below.swap(below, Ordering::Relaxed) == below {
            return;
        }
        if below {
            let events = self.low_water_events.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                free_clusters = free,
                clusters,
                low_water_clusters = mark,
                events,
                "pool below its low-water mark: grow it (vctl pool resize) or free space"
            );
        } else {
            tracing::info!(
                free_clusters = free,
                clusters,
                low_water_clusters = mark,
                "pool above its low-water mark again"
            );
        }
    }

    /// `n` writes failed because the pool was full.
    pub fn refused(&self, n: u64, free: u64, clusters: u64) {
        if n == 0 {
            return;
        }
        let total = self.refused.fetch_add(n, Ordering::Relaxed) + n;
        if once_a_minute(&self.refused_logged) {
            tracing::warn!(
                refused_writes = total,
                clusters,
                free,
                "pool full: writes into unallocated space fail with ENOSPC"
            );
        }
    }

    /// A write found the pool full and waits for space for up to `timeout`.
    pub fn queued(&self, timeout: Duration) {
        let total = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        if once_a_minute(&self.queued_logged) {
            tracing::warn!(
                queued_writes = total,
                timeout_secs = timeout.as_secs(),
                "pool full: writes wait for space (grow the pool: vctl pool resize)"
            );
        }
    }

    /// Space may have appeared: waiting writers look again.
    pub fn space_changed(&self) {
        let _w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// The count of [`Self::space_changed`] so far: take it before trying a write, and wait
    /// with it, so that space appearing in between is not missed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Waits until space may have appeared since `seen` or `deadline` passes; true if it may.
    pub fn wait(&self, seen: u64, deadline: Instant) -> bool {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        while self.generation() == seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            w = self
                .changed
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The counters and marks, with the pool's cluster figures.
    pub fn report(&self, clusters: u64, used: u64, pending_free: u64, free: u64) -> SpaceReport {
        SpaceReport {
            clusters,
            used,
            pending_free,
            free,
            low_water: self.low_water(),
            below_low_water: self.below.load(Ordering::Relaxed),
            low_water_events: self.low_water_events.load(Ordering::Relaxed),
            queued_writes: self.queued.load(Ordering::Relaxed),
            refused_writes: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_low_water_event_fires_once_per_crossing() {
        let w = SpaceWatch::default();
        w.observe_free(1, 100); // no mark: nothing
        w.set_low_water(10);
        w.observe_free(50, 100);
        w.observe_free(9, 100);
        w.observe_free(3, 100);
        let r = w.report(100, 0, 0, 3);
        assert!(r.below_low_water);
        assert_eq!(r.low_water_events, 1);
        w.observe_free(20, 100);
        w.observe_free(5, 100);
        assert_eq!(w.report(100, 0, 0, 5).low_water_events, 2);
    }

    #[test]
    fn a_waiter_wakes_on_a_change_and_gives_up_at_its_deadline() {
        let w = Arc::new(SpaceWatch::default());
        let seen = w.generation();
        assert!(!w.wait(seen, Instant::now() + Duration::from_millis(20)));
        let waker = {
            let w = w.clone();
            std::thread::spawn(move || w.space_changed())
        };
        assert!(w.wait(seen, Instant::now() + Duration::from_secs(60)));
        waker.join().unwrap();
        // A change before the wait began is not missed.
        let seen = w.generation();
        w.space_changed();
        assert!(w.wait(seen, Instant::now() + Duration::from_secs(60)));
    }
}
