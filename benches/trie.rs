//! Trie matching with 100,000 subscriptions: a mix of exact filters, `+` filters and `#` filters
//! over a 3-level topic space, as a fleet of devices and dashboards would subscribe.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tern::topic::SubTrie;

const SUBS: usize = 100_000;

fn build() -> SubTrie<u32, u8> {
    let mut t = SubTrie::new();
    for i in 0..SUBS as u32 {
        let site = i % 100;
        let dev = i % 1000;
        let filter = match i % 10 {
            0..=6 => format!("site{site}/dev{dev}/metric{}", i % 7),
            7 | 8 => format!("site{site}/+/metric{}", i % 7),
            _ => format!("site{site}/dev{dev}/#"),
        };
        t.insert(&filter, i, 0).unwrap();
    }
    t
}

fn match_bench(c: &mut Criterion) {
    let trie = build();
    assert_eq!(trie.len(), SUBS);
    let topics: Vec<String> =
        (0..1000u32).map(|i| format!("site{}/dev{}/metric{}", (i * 7) % 100, (i * 13) % 1000, i % 7)).collect();
    let mut g = c.benchmark_group("trie_100k");
    g.throughput(Throughput::Elements(topics.len() as u64));
    g.bench_function("match_x1000", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for t in &topics {
                trie.for_each_match(t, |k, _| n += *k as usize);
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, match_bench);
criterion_main!(benches);
