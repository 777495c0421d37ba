//! SPSC ring throughput: one producer thread, one consumer thread, a million items per iteration.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::ring::ring;

const ITEMS: u64 = 1_000_000;

fn ring_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("spsc_ring");
    g.throughput(Throughput::Elements(ITEMS));
    g.sample_size(20);
    g.bench_function("cross_thread_1M", |b| {
        b.iter(|| {
            let (mut p, mut cons) = ring::<u64>(16 * 1024);
            let producer = std::thread::spawn(move || {
                let mut i = 0;
                while i < ITEMS {
                    if p.push(i).is_ok() {
                        i += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            let mut n = 0;
            let mut sum = 0u64;
            while n < ITEMS {
                if let Some(v) = cons.pop() {
                    sum = sum.wrapping_add(v);
                    n += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            producer.join().unwrap();
            sum
        })
    });
    g.finish();
}

criterion_group!(benches, ring_bench);
criterion_main!(benches);
