//! Delivery latency: per delivered message, the time from the loop turn that read its PUBLISH
//! to the end of the loop turn that wrote it to the subscriber's socket.
//!
//! Nothing here costs a clock read or a histogram update per message. A delivery notes the
//! message's read time in the turn's list, where consecutive deliveries of messages read in the
//! same turn (the common case: one PUBLISH fanned out, or a batch read together) share one entry
//! with a count. At the end of the turn, after the sockets are written, the clock is read once
//! and each entry is recorded `count` times into the worker's own HDR histogram. Once per tick
//! the worker adds that histogram into its shared slot (one uncontended lock per worker per
//! 250 ms), where `$SYS` and `/metrics` read it.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Microseconds; values past an hour are clamped to it.
const HIGHEST_US: u64 = 3_600_000_000;
/// Entries one turn keeps before recording early (a turn delivering queued messages read in
/// thousands of different turns).
const TURN_ENTRIES: usize = 1024;

/// The instant read times count from: the first one asked for (a worker asks before any read).
/// A read time is a number of nanoseconds since it, so it crosses workers in a batch as it is and
/// the clock is converted once per loop turn, not once per message.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` as a read time: nanoseconds since `epoch()`.
pub fn nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

pub fn histogram() -> Histogram<u64> {
    // Two significant digits: 1% resolution in about 50 KiB.
    Histogram::new_with_bounds(1, HIGHEST_US, 2).expect("valid histogram bounds")
}

/// One worker's deliveries in the current turn, and its histogram since the last tick.
pub struct Latency {
    turn: Vec<(u64, u64)>,
    local: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { turn: Vec::with_capacity(16), local: histogram() }
    }
}

impl Latency {
    /// `n` messages read at `read_at` (`nanos`) were written to a subscriber's output in this turn.
    /// Messages without a read time (retained messages sent on subscribe, `$SYS`, recovered
    /// ones) are not counted.
    #[inline]
    pub fn note(&mut self, read_at: Option<u64>, n: u64) {
        let Some(t) = read_at else { return };
        if n == 0 {
            return;
        }
        if let Some(last) = self.turn.last_mut() {
            if last.0 == t {
                last.1 += n;
                return;
            }
        }
        if self.turn.len() == TURN_ENTRIES {
            self.end_turn(Instant::now());
        }
        self.turn.push((t, n));
    }

    /// After the turn's writes: records what the turn delivered.
    pub fn end_turn(&mut self, now: Instant) {
        let now = nanos(now);
        for (t, n) in self.turn.drain(..) {
            let us = (now.saturating_sub(t) / 1000).clamp(1, HIGHEST_US);
            let _ = self.local.record_n(us, n);
        }
    }

    pub fn turn_is_empty(&self) -> bool {
        self.turn.is_empty()
    }

    /// Once per tick: the worker's figures into its shared slot.
    pub fn publish(&mut self, to: &LatencySlot) {
        if self.local.is_empty() {
            return;
        }
        let mut s = to.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.total.add(&self.local);
        let _ = s.window.add(&self.local);
        drop(s);
        self.local.reset();
    }
}

/// A worker's published latency: since start (for `/metrics`) and since the last `$SYS` update.
pub struct LatencySlot(Mutex<Slot>);

pub struct Slot {
    pub total: Histogram<u64>,
    pub window: Histogram<u64>,
}

impl Default for LatencySlot {
    fn default() -> Self {
        LatencySlot(Mutex::new(Slot { total: histogram(), window: histogram() }))
    }
}

impl LatencySlot {
    pub fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Every worker's window since the last call, merged, and the windows emptied (`$SYS`).
pub fn take_window(slots: &[LatencySlot]) -> Histogram<u64> {
    let mut h = histogram();
    for s in slots {
        s.with(|s| {
            let _ = h.add(&s.window);
            s.window.reset();
        });
    }
    h
}

/// Every worker's histogram since start, merged (`/metrics`).
pub fn total(slots: &[LatencySlot]) -> Histogram<u64> {
    let mut h = histogram();
    for s in slots {
        s.with(|s| {
            let _ = h.add(&s.total);
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fan_out_is_one_entry_recorded_n_times() {
        let mut l = Latency::default();
        let t = Instant::now();
        l.note(Some(nanos(t)), 1);
        l.note(Some(nanos(t)), 99);
        l.note(None, 5);
        assert_eq!(l.turn.len(), 1);
        l.end_turn(t + Duration::from_micros(250));
        assert_eq!(l.local.len(), 100);
        assert!((245..=255).contains(&l.local.value_at_quantile(0.5)));
        let slot = LatencySlot::default();
        l.publish(&slot);
        assert!(l.local.is_empty());
        assert_eq!(take_window(std::slice::from_ref(&slot)).len(), 100);
        assert_eq!(take_window(std::slice::from_ref(&slot)).len(), 0, "the window starts again");
        assert_eq!(total(std::slice::from_ref(&slot)).len(), 100, "the total does not");
    }
}
