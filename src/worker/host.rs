//! Hosting: while the load is light, one thread serves several workers.
//!
//! A message costs a worker thread little; waking it costs more (a context switch, an
//! `epoll_wait`). At a rate one core handles easily, two threads that each serve half the sockets
//! each wake about as often as one thread serving all of them would, for fewer events per wake:
//! the second thread doubles the wake-ups and adds little. So a worker whose thread was mostly
//! idle over its last window, while the host's (worker 0's) thread was too, hands its worker to
//! the host: its epoll is registered in the host's (level-triggered, so readiness in it is
//! readiness in the host's), its `Poll` moves into the worker, and its thread waits. The host then
//! runs the worker's turns after its own, polling the hosted epoll without sleeping, and includes
//! the worker's deadlines in its own sleep. When the host's thread gets busy, it gives the last
//! hosted worker back to its thread. Nothing else changes: the worker keeps its sockets, sessions,
//! rings and parking flag, mail to it is a wake-up of its eventfd (which the host sees) or a turn
//! run by the sender (`help`), exactly as when its own thread sleeps.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Token};

use super::Worker;
use crate::broker::Shared;

/// A hosted worker's epoll is registered in the host's under `HOSTED + worker`.
const HOSTED: usize = usize::MAX / 2 - (1 << 16);

/// The worker whose thread hosts.
pub const HOST: usize = 0;

/// Hand over when the two threads together were busy less than this (thousandths of the window):
/// the host takes the work with room to spare.
const HAND_OVER_BELOW: u32 = 850;
/// Give a worker back when the host's thread was busy more than this.
const GIVE_BACK_ABOVE: u32 = 950;
/// How long a thread measures how busy it is before it decides.
const WINDOW: Duration = Duration::from_millis(20);

pub fn hosted_index(t: Token) -> Option<usize> {
    (t.0 >= HOSTED && t.0 < HOSTED + (1 << 16)).then(|| t.0 - HOSTED)
}

/// What the threads share about hosting (in `Shared`).
pub struct Hosting {
    pub on: bool,
    /// Each worker's epoll, by worker.
    fds: Vec<RawFd>,
    /// Whether each worker is hosted; the host reads it to know whose turns to run (the worker's
    /// `hosted_poll`, behind its lock, is what decides).
    hosted: Vec<AtomicBool>,
    /// A hosted worker's thread waits here until the host gives its worker back.
    resume: Vec<(Mutex<bool>, Condvar)>,
    /// How busy each worker's thread was over its last window, in thousandths.
    busy: Vec<AtomicU32>,
    /// Workers handed to the host, and given back, since the start.
    pub handed_over: AtomicU64,
    pub given_back: AtomicU64,
}

impl Hosting {
    pub fn new(on: bool, fds: Vec<RawFd>) -> Hosting {
        let n = fds.len();
        Hosting {
            on: on && n > 1,
            fds,
            hosted: (0..n).map(|_| AtomicBool::new(false)).collect(),
            resume: (0..n).map(|_| (Mutex::new(false), Condvar::new())).collect(),
            busy: (0..n).map(|_| AtomicU32::new(1000)).collect(),
            handed_over: AtomicU64::new(0),
            given_back: AtomicU64::new(0),
        }
    }

    pub fn is_hosted(&self, p: usize) -> bool {
        self.hosted[p].load(Ordering::Acquire)
    }

    /// Workers hosted now.
    pub fn hosted_count(&self) -> usize {
        self.hosted.iter().filter(|h| h.load(Ordering::Relaxed)).count()
    }

    /// Registers worker `p`'s epoll in the host's: from now on the host runs its turns.
    fn hand_over(&self, p: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: (HOSTED + p) as u64 };
        // SAFETY: both are epoll descriptors owned by `Poll`s alive for the broker's lifetime.
        if unsafe { libc::epoll_ctl(self.fds[HOST], libc::EPOLL_CTL_ADD, self.fds[p], &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.hosted[p].store(true, Ordering::Release);
        self.handed_over.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes worker `p`'s epoll out of the host's before its own thread polls it again (else
    /// the host would see its readiness too, and spin on it). Idempotent.
    fn take_back(&self, p: usize) {
        if self.hosted[p].swap(false, Ordering::AcqRel) {
            // SAFETY: as in `hand_over`; a descriptor not registered gives ENOENT, ignored.
            unsafe { libc::epoll_ctl(self.fds[HOST], libc::EPOLL_CTL_DEL, self.fds[p], std::ptr::null_mut()) };
            self.given_back.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Host: gives worker `p` back to its thread.
    fn give_back(&self, p: usize) {
        self.take_back(p);
        let (flag, cv) = &self.resume[p];
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }

    /// A hosted worker's thread: waits to be given its worker back, or for shutdown.
    fn wait(&self, p: usize, shutdown: &AtomicBool) {
        let (flag, cv) = &self.resume[p];
        let mut resumed = flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*resumed && !shutdown.load(Ordering::SeqCst) {
            resumed = cv.wait(resumed).unwrap_or_else(|e| e.into_inner());
        }
        *resumed = false;
        drop(resumed);
        self.take_back(p);
    }

    /// After `shutdown` is raised: every waiting thread takes its worker back to shut it down.
    pub fn wake_all(&self) {
        for (flag, cv) in &self.resume {
            let _held = flag.lock().unwrap_or_else(|e| e.into_inner());
            cv.notify_all();
        }
    }
}

/// How busy a thread is: the share of a window it spent outside `poll`.
pub struct Load {
    window_start: Instant,
    idle: Duration,
}

impl Load {
    pub fn new() -> Load {
        Load { window_start: Instant::now(), idle: Duration::ZERO }
    }

    /// A poll that started at `slept_from` returned at `woke`. At the end of a window, returns
    /// how busy the thread was in it, in thousandths.
    fn account(&mut self, slept_from: Instant, woke: Instant) -> Option<u32> {
        self.idle += woke.saturating_duration_since(slept_from);
        let elapsed = woke.saturating_duration_since(self.window_start);
        if elapsed < WINDOW {
            return None;
        }
        let busy = 1000 - (self.idle.as_micros() * 1000 / elapsed.as_micros().max(1)).min(1000) as u32;
        self.window_start = woke;
        self.idle = Duration::ZERO;
        Some(busy)
    }
}

/// How soon a worker given back may be handed over again: a load that the host cannot carry
/// alone but two idle-looking threads can (each waiting on the other, or on the clients) would
/// otherwise move the worker back and forth every few windows. The wait doubles each time a
/// worker comes back soon after it was handed over, and starts again short once a stay was long.
pub struct Backoff {
    not_before: Instant,
    wait: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A stay with the host this long was not a flap.
const LONG_STAY: Duration = Duration::from_secs(1);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { not_before: Instant::now(), wait: BACKOFF_FIRST }
    }

    pub fn allows(&self, now: Instant) -> bool {
        now >= self.not_before
    }

    /// The worker, handed over at `handed`, is back with its thread.
    pub fn given_back(&mut self, handed: Instant) {
        let now = Instant::now();
        self.wait =
            if now.duration_since(handed) >= LONG_STAY { BACKOFF_FIRST } else { (self.wait * 2).min(BACKOFF_MAX) };
        self.not_before = now + self.wait;
    }
}

/// What the host's thread keeps about the workers it hosts.
pub struct Host {
    events: Events,
    /// When each hosted worker must run next, as its last turn left it (None: not asked yet).
    due: Vec<Option<Instant>>,
    /// Hosted workers whose epoll was ready in the last poll.
    ready: Vec<bool>,
}

impl Host {
    pub fn new(n: usize) -> Host {
        Host { events: Events::with_capacity(1024), due: vec![None; n], ready: vec![false; n] }
    }

    /// Before the host sleeps: how long it may, given its own `timeout` and what each hosted
    /// worker needs (its deadlines, work pending, mail).
    pub fn before_poll(&mut self, shared: &Shared, now: Instant, mut timeout: Duration) -> Duration {
        for p in 1..shared.workers {
            if !shared.hosting.is_hosted(p) {
                self.due[p] = None;
                continue;
            }
            let due = match self.due[p] {
                Some(at) => at,
                None => {
                    let Ok(mut slot) = shared.slots[p].lock() else { continue };
                    let Some(w) = slot.as_deref_mut().filter(|w| w.hosted_poll.is_some()) else { continue };
                    let at = w.clock.now + w.before_poll();
                    self.due[p] = Some(at);
                    at
                }
            };
            timeout = timeout.min(due.saturating_duration_since(now));
        }
        timeout
    }

    /// After the host's own turn: a turn for each hosted worker whose epoll was ready or whose
    /// time came.
    pub fn turns(&mut self, shared: &Shared, events: &Events, now: Instant) {
        for ev in events.iter() {
            if let Some(p) = hosted_index(ev.token()).filter(|&p| p < self.ready.len()) {
                self.ready[p] = true;
            }
        }
        for p in 1..shared.workers {
            let ready = std::mem::take(&mut self.ready[p]);
            if !shared.hosting.is_hosted(p) || !(ready || self.due[p].is_some_and(|at| at <= now)) {
                continue;
            }
            // Taken: a peer runs a turn for it (and parks it again or wakes it), or its thread
            // is taking it back.
            let Ok(mut slot) = shared.slots[p].try_lock() else { continue };
            let Some(w) = slot.as_deref_mut() else { continue };
            if w.hosted_poll_turn(&mut self.events) {
                self.due[p] = None;
            }
        }
    }

    /// End of a window of the host's thread: gives the last hosted worker back if it is busy.
    fn decide(&mut self, shared: &Shared, busy: u32) {
        if busy > GIVE_BACK_ABOVE {
            if let Some(p) = (1..shared.workers).rev().find(|&p| shared.hosting.is_hosted(p)) {
                log::debug!("worker {p}: given back to its thread (host busy {busy}/1000)");
                shared.hosting.give_back(p);
                self.due[p] = None;
            }
        }
    }
}

impl Worker {
    /// A turn run by the host for this hosted worker: what its epoll has ready now, then the
    /// turn. Returns false if the worker is not hosted (its thread took it back).
    fn hosted_poll_turn(&mut self, events: &mut Events) -> bool {
        let Some(mut poll) = self.hosted_poll.take() else { return false };
        if poll.poll(events, Some(Duration::ZERO)).is_err() {
            events.clear();
        }
        self.hosted_poll = Some(poll);
        self.shared.parking[self.id].unpark();
        self.turn(events);
        true
    }
}

/// A worker thread's part in hosting, once per loop: measures how busy the thread is and, at the
/// end of a window, decides. The host may give a worker back; another thread returns whether it
/// should hand its worker to the host now (both threads were idle enough; see `hosted`).
pub fn after_turn(
    id: usize,
    shared: &Shared,
    load: &mut Load,
    host: Option<&mut Host>,
    slept_from: Instant,
    woke: Instant,
) -> bool {
    let hosting = &shared.hosting;
    let Some(busy) = load.account(slept_from, woke) else { return false };
    hosting.busy[id].store(busy, Ordering::Relaxed);
    if let Some(host) = host {
        host.decide(shared, busy);
        return false;
    }
    let host_busy = hosting.busy[HOST].load(Ordering::Relaxed);
    hosting.on && busy + host_busy < HAND_OVER_BELOW && !shared.shutdown.load(Ordering::SeqCst)
}

/// Hands worker `id` with its `poll` to the host and waits to get it back; returns the poll.
pub fn hosted(id: usize, shared: &Shared, poll: mio::Poll) -> io::Result<mio::Poll> {
    let slot = &shared.slots[id];
    let lock = || slot.lock().map_err(|_| io::Error::other("a turn run for this worker by another thread panicked"));
    {
        let mut g = lock()?;
        let w = g.as_deref_mut().ok_or_else(|| io::Error::other("worker gone"))?;
        if let Err(e) = shared.hosting.hand_over(id) {
            log::warn!("worker {id} cannot be hosted: {e}");
            return Ok(poll);
        }
        w.hosted_poll = Some(poll);
    }
    log::debug!("worker {id}: handed to worker {HOST}'s thread");
    // The host plans its sleep anew with this worker's deadlines.
    let _ = shared.wakers[HOST].wake();
    shared.hosting.wait(id, &shared.shutdown);
    let mut g = lock()?;
    let w = g.as_deref_mut().ok_or_else(|| io::Error::other("worker gone"))?;
    w.hosted_poll.take().ok_or_else(|| io::Error::other("hosted worker lost its poll"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reports_the_share_of_it_spent_outside_poll() {
        let start = Instant::now();
        let mut load = Load { window_start: start, idle: Duration::ZERO };
        let ms = |n| start + Duration::from_millis(n);
        // 15 ms asleep of the first 20: a quarter busy, reported when the window ends.
        assert_eq!(load.account(ms(0), ms(10)), None);
        assert_eq!(load.account(ms(12), ms(17)), None);
        assert_eq!(load.account(ms(20), ms(20)), Some(250));
        // The next window starts where that one ended: never asleep, fully busy.
        assert_eq!(load.account(ms(45), ms(45)), Some(1000));
        // Asleep the whole window: idle.
        assert_eq!(load.account(ms(45), ms(70)), Some(0));
    }

    #[test]
    fn a_worker_coming_back_soon_waits_longer_each_time_and_a_long_stay_resets_the_wait() {
        let mut b = Backoff::new();
        assert!(b.allows(Instant::now()));
        let handed = Instant::now();
        b.given_back(handed);
        assert_eq!(b.wait, BACKOFF_FIRST * 2);
        assert!(!b.allows(Instant::now()));
        assert!(b.allows(Instant::now() + BACKOFF_FIRST * 2));
        for _ in 0..10 {
            b.given_back(Instant::now());
        }
        assert_eq!(b.wait, BACKOFF_MAX, "the wait is bounded");
        b.given_back(Instant::now() - LONG_STAY);
        assert_eq!(b.wait, BACKOFF_FIRST);
    }

    #[test]
    fn tokens_of_hosted_workers_are_apart_from_connections_listeners_and_lingering() {
        assert_eq!(hosted_index(Token(HOSTED + 3)), Some(3));
        assert_eq!(hosted_index(Token(5)), None);
        assert_eq!(hosted_index(super::super::WAKER), None);
        assert_eq!(hosted_index(Token(super::super::linger::TOKEN_BASE)), None);
        const { assert!(HOSTED + (1 << 16) <= super::super::linger::TOKEN_BASE) };
    }
}
