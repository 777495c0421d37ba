//! The single-producer single-consumer ring that carries messages between two workers, and the
//! mailbox (rings from every peer plus a waker) through which a worker receives them.
//!
//! Lock-free and bounded: `push` never blocks and fails when full; the producer keeps what did not
//! fit. It must not know what it carries.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

struct Inner<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    /// Next slot to read; written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Next slot to write; written only by the producer.
    tail: CachePadded<AtomicUsize>,
}

// SAFETY: a slot is written only by the one producer while it is outside [head, tail), and read
// only by the one consumer while it is inside; the Release/Acquire pairs on head and tail order
// those accesses. T moves between threads, hence T: Send.
unsafe impl<T: Send> Sync for Inner<T> {}
unsafe impl<T: Send> Send for Inner<T> {}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        let (mut h, t) = (*self.head.get_mut(), *self.tail.get_mut());
        while h != t {
            // SAFETY: slots in [head, tail) hold initialised values nobody else can reach now.
            unsafe { (*self.slots[h & self.mask].get()).assume_init_drop() };
            h = h.wrapping_add(1);
        }
    }
}

pub struct Producer<T> {
    inner: Arc<Inner<T>>,
    /// The consumer's index as last read: the ring has at least this much room.
    cached_head: usize,
}

pub struct Consumer<T> {
    inner: Arc<Inner<T>>,
}

/// A ring holding up to `capacity` (rounded up to a power of two) items.
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity.max(2).next_power_of_two();
    let slots = (0..cap).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect();
    let inner = Arc::new(Inner {
        slots,
        mask: cap - 1,
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
    });
    (Producer { inner: inner.clone(), cached_head: 0 }, Consumer { inner })
}

impl<T> Producer<T> {
    /// Adds `value`, or hands it back when the ring is full. Reads the consumer's index only when
    /// the ring looks full from the cached copy, so a stream of pushes does not bounce the
    /// consumer's cache line. Waking the consumer is the mailbox's business (`Parking`).
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let r = &*self.inner;
        let tail = r.tail.load(Ordering::Relaxed);
        if tail.wrapping_sub(self.cached_head) > r.mask {
            self.cached_head = r.head.load(Ordering::Acquire);
            if tail.wrapping_sub(self.cached_head) > r.mask {
                return Err(value);
            }
        }
        // SAFETY: the slot at tail is outside [head, tail), so the consumer does not read it.
        unsafe { (*r.slots[tail & r.mask].get()).write(value) };
        r.tail.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Whether the ring holds fewer than `n` items; reads the consumer's index only when the
    /// cached copy says otherwise.
    pub fn holds_fewer_than(&mut self, n: usize) -> bool {
        let tail = self.inner.tail.load(Ordering::Relaxed);
        if tail.wrapping_sub(self.cached_head) < n {
            return true;
        }
        self.cached_head = self.inner.head.load(Ordering::Acquire);
        tail.wrapping_sub(self.cached_head) < n
    }
}

impl<T> Consumer<T> {
    pub fn pop(&mut self) -> Option<T> {
        let r = &*self.inner;
        let head = r.head.load(Ordering::Relaxed);
        if head == r.tail.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: head < tail, so the producer finished writing this slot (Acquire on tail).
        let v = unsafe { (*r.slots[head & r.mask].get()).assume_init_read() };
        r.head.store(head.wrapping_add(1), Ordering::Release);
        Some(v)
    }

    pub fn len(&self) -> usize {
        let r = &*self.inner;
        r.tail.load(Ordering::Acquire).wrapping_sub(r.head.load(Ordering::Acquire))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a consumer sleeps without missing mail, and how producers know when to wake it.
///
/// The consumer raises `parked`, then looks at its rings once more before it sleeps; a producer
/// that has pushed lowers `parked` and wakes the consumer if it was raised. The SeqCst fences on
/// both sides make the pair a Dekker handshake: either the consumer sees the push and does not
/// sleep, or the producer sees `parked` and wakes it. A busy consumer is never woken at all: one
/// syscall per sleep of the consumer, not per message or per batch.
#[derive(Default, Debug)]
pub struct Parking {
    parked: std::sync::atomic::AtomicBool,
}

impl Parking {
    /// Consumer: about to sleep. Returns whether it may (`rings_empty` is asked after the flag is
    /// raised); when it may not, the flag is lowered again.
    pub fn park(&self, rings_empty: impl FnOnce() -> bool) -> bool {
        self.parked.store(true, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        if rings_empty() {
            true
        } else {
            self.parked.store(false, Ordering::Relaxed);
            false
        }
    }

    /// Consumer: awake again.
    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Producer, after pushing: whether the consumer sleeps and must be woken (at most one
    /// producer gets `true` per sleep).
    pub fn needs_wake(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_with_wrap_around_and_full_detection() {
        let (mut p, mut c) = ring::<u32>(4);
        for round in 0..10u32 {
            for i in 0..4 {
                assert_eq!(p.push(round * 10 + i), Ok(()));
            }
            assert_eq!(p.push(99), Err(99), "full at capacity");
            for i in 0..4 {
                assert_eq!(c.pop(), Some(round * 10 + i));
            }
            assert_eq!(c.pop(), None);
        }
    }

    #[test]
    fn concurrent_producer_and_consumer_lose_and_duplicate_nothing() {
        const N: u64 = 2_000_000;
        let (mut p, mut c) = ring::<u64>(1024);
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                match p.push(i) {
                    Ok(_) => i += 1,
                    Err(_) => std::hint::spin_loop(),
                }
            }
        });
        let mut expect = 0;
        let mut sum = 0u64;
        while expect < N {
            if let Some(v) = c.pop() {
                assert_eq!(v, expect, "in order, no loss, no duplicate");
                sum += v;
                expect += 1;
            } else {
                std::hint::spin_loop();
            }
        }
        producer.join().unwrap();
        assert_eq!(c.pop(), None);
        assert_eq!(sum, N * (N - 1) / 2);
    }

    /// A consumer that parks and a producer that pushes then checks `needs_wake`: however they
    /// interleave, an item pushed is either seen before sleeping or followed by a wake.
    #[test]
    fn parking_never_sleeps_through_a_push() {
        use std::sync::atomic::AtomicUsize;
        const N: usize = 20_000;
        let (mut p, mut c) = ring::<usize>(64);
        let parking = Arc::new(Parking::default());
        let wakes = Arc::new(AtomicUsize::new(0));
        let (pk, wk) = (parking.clone(), wakes.clone());
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                while p.push(i).is_err() {
                    std::hint::spin_loop();
                }
                if pk.needs_wake() {
                    wk.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let mut got = 0;
        let mut seen_wakes = 0;
        while got < N {
            while let Some(v) = c.pop() {
                assert_eq!(v, got);
                got += 1;
            }
            if got == N {
                break;
            }
            if parking.park(|| c.is_empty()) {
                // "Sleep": wait for a wake; a push with no wake would hang here (the test's
                // timeout would catch it), so spin on the wake counter.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while wakes.load(Ordering::SeqCst) == seen_wakes {
                    assert!(std::time::Instant::now() < deadline, "slept through a push at {got}");
                    std::hint::spin_loop();
                }
                seen_wakes = wakes.load(Ordering::SeqCst);
                parking.unpark();
            }
        }
        producer.join().unwrap();
    }

    #[test]
    fn values_left_in_a_dropped_ring_are_dropped() {
        let token = Arc::new(());
        let (mut p, c) = ring::<Arc<()>>(8);
        for _ in 0..5 {
            p.push(token.clone()).unwrap();
        }
        drop((p, c));
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
