//! The bets file: encoding rows, appending batches through the writer,
//! and the draw's streaming scan.
//!
//! `cargo bench --bench storage`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use lottery::model::Bets;
use lottery::store::file::{encode_rows, read_rows, tally, BetStore};
use lottery::store::Durability;
use lottery::tools::gen_data::{self, GenOptions};

fn bets(n: usize) -> Bets {
    let mut bets = Bets::new();
    for i in 0..n {
        bets.push_fields(
            &(1 + i % 5).to_string(),
            ["Santiago Lionel", "Agustín", "María José", "Iñaki"][i % 4],
            ["Lorca", "Núñez", "Fernández", "Peña"][i % 4],
            &(20_000_000 + i * 37).to_string(),
            "1999-03-17",
            &((i * 7919) % 10_000).to_string(),
        )
        .unwrap();
    }
    bets
}

fn bench(c: &mut Criterion) {
    let batch = bets(70);
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Elements(70));
    g.bench_function("encode_rows_70", |b| {
        b.iter(|| {
            let mut rows = Vec::with_capacity(70 * 64);
            encode_rows(batch.iter(), &mut rows);
            black_box(rows)
        })
    });

    // Appending through the writer, 100 batches of 70 in flight at once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    encode_rows(batch.iter(), &mut rows);
    // 100 batches of 70 in flight at once, as from many agencies: group
    // commit lets them share syncs.
    g.throughput(Throughput::Elements(70 * 100));
    for (name, durability) in [
        ("append_100x70_sync", Durability::Sync),
        ("append_100x70_nosync", Durability::NoSync),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (store, writer) = BetStore::start(&dir.path().join("bets.csv"), durability);
                    let mut tasks = Vec::new();
                    for _ in 0..100 {
                        let (store, rows) = (store.clone(), rows.clone());
                        tasks.push(tokio::spawn(
                            async move { store.append(rows).await.unwrap() },
                        ));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                    drop(store);
                    writer.await.unwrap();
                })
            })
        });
    }
    // One batch at a time, each waiting for its own sync: the cost a lone
    // agency sees per acknowledgement.
    g.throughput(Throughput::Elements(70));
    g.bench_function("append_1x70_sync", |b| {
        let (store, _writer) =
            rt.block_on(async { BetStore::start(&dir.path().join("one.csv"), Durability::Sync) });
        b.iter(|| rt.block_on(store.append(rows.clone())).unwrap())
    });

    // The draw's scan over 1,000,000 stored bets, as the central stores
    // them from generated agency files (varied names and lengths).
    const STORED: usize = 1_000_000;
    let path = dir.path().join("scan.csv");
    let data = dir.path().join("data");
    let gen = GenOptions {
        agencies: 5,
        bets_per_agency: (STORED / 5) as u64,
        ..GenOptions::default()
    };
    gen_data::generate(&data, &gen).unwrap();
    let mut file = Vec::new();
    for agency in 1..=5u32 {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(data.join(format!("agency-{agency}.csv")))
            .unwrap();
        let mut stored = Bets::new();
        for record in reader.records() {
            let r = record.unwrap();
            stored
                .push_for(agency, &r[0], &r[1], &r[2], &r[3], &r[4])
                .unwrap();
        }
        encode_rows(stored.iter(), &mut file);
    }
    std::fs::write(&path, &file).unwrap();
    g.throughput(Throughput::Elements(STORED as u64));
    g.sample_size(10);
    g.bench_function("draw_scan_1m", |b| {
        b.iter(|| {
            let mut winners = 0u64;
            let n = read_rows(&path, |bet| winners += u64::from(bet.number == 7574)).unwrap();
            black_box((n, winners))
        })
    });
    // What the draw runs: the same file, tallied by two threads.
    g.bench_function("draw_tally_1m", |b| {
        b.iter(|| black_box(tally(&path, 7574).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
