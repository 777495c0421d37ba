//! Decode and encode a batch of small PUBLISH packets (20-byte topic, 64-byte payload), ours and
//! an independent codec (`mqttbytes`) in the same run, so the README can quote a ratio.

use bytes::Buf;
use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tern::codec::{decode, next_frame, Packet, ProtocolVersion, Publish, PublishRef, QoS};

const BATCH: usize = 1000;
const TOPIC: &str = "sensors/room-12/temp"; // 20 bytes
const MAX: usize = 1 << 20;

fn batch() -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..BATCH {
        let mut p = Publish::new(TOPIC, QoS::AtMostOnce, Bytes::from(vec![i as u8; 64]));
        if i % 2 == 1 {
            p.qos = QoS::AtLeastOnce;
            p.packet_id = std::num::NonZeroU16::new(i as u16);
        }
        p.encode(ProtocolVersion::V311, &mut buf);
    }
    buf
}

fn decode_bench(c: &mut Criterion) {
    let wire = batch();
    let mut g = c.benchmark_group("decode_publish_x1000");
    g.throughput(Throughput::Elements(BATCH as u64));
    // The broker's path: PUBLISH parsed in place, nothing allocated or reference-counted.
    g.bench_function("tern", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                let mut n = 0;
                let mut at = 0;
                while let Ok(Some((first, hl, size))) = next_frame(&buf[at..], Some(ProtocolVersion::V311), MAX) {
                    let body = &buf[at + hl..at + size];
                    if let Ok(p) = PublishRef::parse(body, first & 0x0f, ProtocolVersion::V311) {
                        n += p.payload.len() + p.topic.len();
                    }
                    at += size;
                }
                buf.advance(at);
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    // Owned packets: topic and payload as `Bytes` slices of the read buffer.
    g.bench_function("tern_owned", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                let mut n = 0;
                while let Ok(Some(p)) = decode(buf, Some(ProtocolVersion::V311), MAX) {
                    if let Packet::Publish(p) = p {
                        n += p.payload.len();
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("mqttbytes", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                let mut n = 0;
                while let Ok(p) = mqttbytes::v4::read(buf, MAX) {
                    if let mqttbytes::v4::Packet::Publish(p) = p {
                        n += p.payload.len();
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn encode_bench(c: &mut Criterion) {
    let payload = Bytes::from(vec![7u8; 64]);
    let ours: Vec<Publish> = (0..BATCH).map(|_| Publish::new(TOPIC, QoS::AtMostOnce, payload.clone())).collect();
    let theirs: Vec<mqttbytes::v4::Publish> = (0..BATCH)
        .map(|_| mqttbytes::v4::Publish::from_bytes(TOPIC, mqttbytes::QoS::AtMostOnce, payload.clone()))
        .collect();
    let mut g = c.benchmark_group("encode_publish_x1000");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut out = BytesMut::with_capacity(BATCH * 100);
    g.bench_function("tern", |b| {
        b.iter(|| {
            out.clear();
            for p in &ours {
                p.encode(ProtocolVersion::V311, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("tern_head_only", |b| {
        b.iter(|| {
            out.clear();
            for p in &ours {
                p.encode_head(ProtocolVersion::V311, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("mqttbytes", |b| {
        b.iter(|| {
            out.clear();
            for p in &theirs {
                p.write(&mut out).unwrap();
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, decode_bench, encode_bench);
criterion_main!(benches);
