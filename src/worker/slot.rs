//! A worker's slot: where its state lives between its thread and its peers. The thread locks it
//! for a turn and leaves it free while it sleeps in `poll` (`run`); a peer with mail for the
//! sleeping worker may take it meanwhile and run one turn for it instead of waking it (`help`).
//! One thread at a time, never two; nothing waits for the lock but the worker's own thread and,
//! while the worker is hosted, the thread that hosts it (`host`).

use std::io;
use std::sync::{Arc, Mutex};

use mio::net::TcpListener;
use mio::{Events, Poll};

use super::{host, Mail, Worker};
use crate::broker::Shared;
use crate::ring::{Consumer, Producer};

impl Worker {
    /// Runs one turn for sleeping peer `p` that this turn sent mail to, instead of waking it:
    /// its thread stays asleep, so the mail costs no wake-up, no context switch and no second
    /// poll. Returns whether `p` sleeps on with nothing due before it planned to wake; if not
    /// (its lock is taken, it has work left, or the turn set an earlier deadline), it must be
    /// woken. A helped turn wakes its own peers rather than helping them.
    pub(super) fn help(&mut self, p: usize) -> bool {
        if self.helping {
            return false;
        }
        let Ok(mut slot) = self.shared.slots[p].try_lock() else { return false };
        let Some(peer) = slot.as_mut() else { return false };
        peer.helping = true;
        peer.turn(&Events::with_capacity(0));
        peer.helping = false;
        self.mailbox.helped += 1;
        let due = peer.clock.ms + peer.sleep_time().as_millis() as u64;
        let quiet = peer.turn.more_to_read.is_empty() && peer.turn.dirty.is_empty() && due >= peer.wake_at_ms;
        let mailbox = &peer.mailbox;
        quiet && self.shared.parking[p].park(|| mailbox.inbox_empty())
    }
}

/// A worker's thread: builds the worker into its slot (`Shared::slots`), then loops: decide how
/// long to sleep, poll, run the turn. The worker is locked for its turn and unlocked while its
/// thread sleeps, when a peer may run a turn for it (`Worker::help`). Worker 0's thread also
/// runs the turns of the workers it hosts and sleeps no longer than their deadlines; another
/// thread, idle enough, hands its worker to it and waits until it gets it back (`host`).
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    mut poll: Poll,
    listeners: Vec<TcpListener>,
    outbox: Vec<Option<Producer<Mail>>>,
    inbox: Vec<Option<Consumer<Mail>>>,
) -> io::Result<()> {
    let registry = poll.registry().try_clone()?;
    let slot = &shared.slots[id];
    // Poisoned: a peer panicked running a turn for this worker, whose state may be half-changed.
    let lock = || slot.lock().map_err(|_| io::Error::other("a turn run for this worker by a peer panicked"));
    *lock()? = Some(Box::new(Worker::new(id, shared.clone(), registry, listeners, outbox, inbox)));
    // Taken out of the slot when the thread ends, however it ends: the worker holds the `Shared`
    // that holds the slot.
    struct Vacate<'a>(&'a Mutex<Option<Box<Worker>>>);
    impl Drop for Vacate<'_> {
        fn drop(&mut self) {
            let w = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(w);
        }
    }
    let _vacate = Vacate(slot);
    lock()?.as_deref_mut().ok_or_else(|| io::Error::other("worker gone"))?.start()?;
    let mut events = Events::with_capacity(1024);
    let hosting = shared.hosting.on;
    let mut host = (hosting && id == host::HOST).then(|| host::Host::new(shared.workers));
    let mut load = host::Load::new();
    let mut backoff = host::Backoff::new();
    loop {
        let (timeout, slept_from) = match lock()?.as_deref_mut() {
            Some(w) => (w.before_poll(), w.clock.now),
            None => return Ok(()),
        };
        let timeout = match host.as_mut() {
            Some(h) => h.before_poll(&shared, slept_from, timeout),
            None => timeout,
        };
        let polled = poll.poll(&mut events, Some(timeout));
        let woke = {
            let mut g = lock()?;
            let Some(w) = g.as_deref_mut() else { return Ok(()) };
            w.shared.parking[id].unpark();
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                events.clear();
            }
            if !w.turn(&events) {
                return Ok(());
            }
            w.clock.now
        };
        if let Some(h) = host.as_mut() {
            h.turns(&shared, &events, woke);
        }
        if hosting && host::after_turn(id, &shared, &mut load, host.as_mut(), slept_from, woke) && backoff.allows(woke)
        {
            poll = host::hosted(id, &shared, poll)?;
            backoff.given_back(woke);
            load = host::Load::new();
        }
    }
}
