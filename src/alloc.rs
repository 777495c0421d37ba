//! Heap bytes in use, for `memory_limit`: the system allocator with a count kept per thread and
//! folded into one shared total every 256 KiB of change, so an allocation costs a thread-local
//! add, not a contended atomic. The total is exact to within 256 KiB per thread.
//!
//! The `tern` binary installs it (`#[global_allocator]` in `main.rs`); without it (the library
//! used in-process) `allocated()` stays 0 and `memory_limit` never trips.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

static TOTAL: AtomicIsize = AtomicIsize::new(0);
const FOLD: isize = 256 * 1024;

thread_local! {
    // A `Cell<isize>` needs no destructor, so it is usable from inside the allocator at any
    // point of a thread's life.
    static LOCAL: Cell<isize> = const { Cell::new(0) };
}

#[inline]
fn count(delta: isize) {
    let _ = LOCAL.try_with(|c| {
        let v = c.get() + delta;
        if v.abs() >= FOLD {
            TOTAL.fetch_add(v, Ordering::Relaxed);
            c.set(0);
        } else {
            c.set(v);
        }
    });
}

/// Heap bytes allocated and not yet freed, over all threads (0 unless `Counting` is installed).
pub fn allocated() -> usize {
    TOTAL.load(Ordering::Relaxed).max(0) as usize
}

/// The system allocator, counting.
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}
