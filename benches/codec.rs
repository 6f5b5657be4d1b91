//! Codec throughput: encoding and decoding realistic full batches.
//!
//! `cargo bench --bench codec`; criterion reports bytes/s (MB/s) and, in the
//! `bets` group, bets/s.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

use lottery::model::Bets;
use lottery::wire::{AgencyCodec, BatchBuilder, Request, ServerCodec};

/// Batches as an agency cuts them: up to 70 bets, each frame under 8 KiB.
fn realistic_batches(total: usize) -> Vec<Request> {
    let first = [
        "Santiago Lionel",
        "Agustín",
        "María José",
        "Tomás",
        "Lucía",
        "Iñaki",
    ];
    let last = ["Lorca", "Núñez", "Fernández", "Peña", "Ibáñez", "Zúñiga"];
    let mut batches = Vec::new();
    let mut current = Bets::new();
    let mut builder = BatchBuilder::new(Some(0));
    for i in 0..total {
        current
            .push_fields(
                "3",
                first[i % first.len()],
                last[(i / 7) % last.len()],
                &(20_000_000 + i * 37).to_string(),
                &format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28),
                &((i * 7919) % 10_000).to_string(),
            )
            .unwrap();
        let bet = current.get(current.len() - 1).unwrap();
        if builder.count() == 70 || !builder.push(bet) {
            let bet = current.split_last();
            let bets = std::mem::replace(&mut current, bet);
            batches.push(Request::Batch {
                first: Some((i - bets.len()) as u64),
                bets,
            });
            builder = BatchBuilder::new(Some(i as u64));
            builder.push(current.get(0).unwrap());
        }
    }
    if !current.is_empty() {
        batches.push(Request::Batch {
            first: Some((total - current.len()) as u64),
            bets: current,
        });
    }
    batches
}

fn encode_all(batches: &[Request]) -> BytesMut {
    let mut codec = AgencyCodec::new();
    let mut wire = BytesMut::new();
    for b in batches {
        codec.encode(b, &mut wire).unwrap();
    }
    wire
}

fn bench(c: &mut Criterion) {
    const BETS: usize = 7_000;
    let batches = realistic_batches(BETS);
    let wire = encode_all(&batches);

    let mut g = c.benchmark_group("codec_bytes");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    // The copy of the input each run starts from is made outside the timing.
    g.bench_function("decode", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                let mut codec = ServerCodec::new();
                let mut n = 0;
                while let Some(item) = codec.decode(&mut buf).unwrap() {
                    n += usize::from(item.is_ok());
                }
                black_box(n)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("encode", |b| b.iter(|| black_box(encode_all(&batches))));
    g.finish();

    let mut g = c.benchmark_group("codec_bets");
    g.throughput(Throughput::Elements(BETS as u64));
    g.bench_function("decode", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                let mut codec = ServerCodec::new();
                while let Some(item) = codec.decode(&mut buf).unwrap() {
                    black_box(item.unwrap());
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
