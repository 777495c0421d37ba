//! Deadlines in a heap: the connect timeout and keep alive of connections, the will delay and
//! expiry of sessions. A timer is a reminder to look, not a verdict: when one fires the worker
//! checks the current state (a keep alive refreshed by a read since is simply re-armed), so reads
//! never touch the heap and the tick never walks every connection.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::conn::ConnKey;
use crate::session::SessionKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// Connect timeout or keep alive of a connection, if it still has this uid.
    Conn(usize, u64),
    /// Will delay or expiry of a session, if it still has this uid.
    Session(usize, u64),
    /// Whether a congested session has stalled (flow control).
    Stall(usize, u64),
    /// Whether a connection sits silent in the middle of a packet (`partial_packet_timeout`).
    Partial(usize, u64),
    /// The end of a closed connection's lingering (`linger`).
    Linger(usize, u64),
}

impl Timer {
    pub fn conn(k: ConnKey, uid: u64) -> Timer {
        Timer::Conn(k.0, uid)
    }

    pub fn session(sk: SessionKey, uid: u64) -> Timer {
        Timer::Session(sk.0, uid)
    }
}

/// Deadlines in worker clock milliseconds (`Clock::ms`).
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(u64, Timer)>>,
}

impl Timers {
    pub fn arm(&mut self, at_ms: u64, t: Timer) {
        self.heap.push(Reverse((at_ms, t)));
    }

    /// The next timer due at or before `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now_ms => self.heap.pop().map(|Reverse((_, t))| t),
            _ => None,
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_and_not_before() {
        let mut t = Timers::default();
        t.arm(30, Timer::Conn(1, 1));
        t.arm(10, Timer::Session(2, 7));
        t.arm(20, Timer::Conn(3, 1));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(25), Some(Timer::Session(2, 7)));
        assert_eq!(t.pop_due(25), Some(Timer::Conn(3, 1)));
        assert_eq!(t.pop_due(25), None);
        assert_eq!(t.next_deadline(), Some(30));
    }
}
