//! What a SUBSCRIBE costs against the retained store as the store grows: 1,000 exact-topic filters
//! and 1,000 narrow `+` filters matched against 1,000, 10,000 and 100,000 retained topics. The
//! per-filter time should not grow with the store (it did when every filter scanned every
//! retained message).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tern::codec::{MqttStr, QoS};
use tern::router::RetainedTree;
use tern::session::Message;

fn store(n: usize) -> RetainedTree {
    let mut t = RetainedTree::default();
    for i in 0..n {
        let topic = MqttStr::from(format!("site{}/dev{}/temp", i % 100, i / 100));
        t.insert(Arc::new(Message::plain(topic, Bytes::from_static(b"21.5"), QoS::AtMostOnce, true)));
    }
    t
}

fn subscribe_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("retained_subscribe");
    g.throughput(Throughput::Elements(1000));
    for n in [1_000usize, 10_000, 100_000] {
        let t = store(n);
        assert_eq!(t.len(), n);
        let exact: Vec<String> = (0..1000).map(|i| format!("site{}/dev{}/temp", i % 100, (i * 7) % 10)).collect();
        let narrow: Vec<String> = (0..1000).map(|i| format!("site{}/+/temp", i % 100)).collect();
        let now = Instant::now();
        g.bench_with_input(BenchmarkId::new("exact_x1000", n), &exact, |b, filters| {
            b.iter(|| {
                let mut hits = 0usize;
                for f in filters {
                    t.for_each_match(f, now, |_| hits += 1);
                }
                black_box(hits)
            })
        });
        g.bench_with_input(BenchmarkId::new("miss_x1000", n), &exact, |b, filters| {
            b.iter(|| {
                let mut hits = 0usize;
                for f in filters {
                    t.for_each_match(&f.replace("temp", "none"), now, |_| hits += 1);
                }
                black_box(hits)
            })
        });
        if n <= 10_000 {
            // `+` over a level whose width grows with the store: grows with what it matches.
            g.bench_with_input(BenchmarkId::new("plus_x1000", n), &narrow, |b, filters| {
                b.iter(|| {
                    let mut hits = 0usize;
                    for f in filters {
                        t.for_each_match(f, now, |_| hits += 1);
                    }
                    black_box(hits)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, subscribe_bench);
criterion_main!(benches);
