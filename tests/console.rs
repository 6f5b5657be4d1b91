//! tokio-console attached for real: the console build of the central
//! (`--features console`, `--cfg tokio_unstable`, built once into
//! `target/console`), a whole round through it, and a gRPC client of the
//! console's own API (`console-api`, as `tokio-console` connects) that must
//! see the central's named tasks: the listener, a connection's, the bets
//! writer, the draw and the admin listener.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use console_api::{field, Field};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

/// Builds the console build of the central (incrementally, after the first
/// time) and returns its path. Its own target directory: the cfg flag
/// changes every crate's build, which would otherwise rebuild the usual
/// target each time.
fn console_build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/console");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    flags.push_str(" --cfg tokio_unstable");
    let status = Command::new(cargo)
        .args([
            "build",
            "--locked",
            "--features",
            "console",
            "--bin",
            "lottery",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env("RUSTFLAGS", flags.trim())
        .current_dir(root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the console build: {status}");
    target.join("debug/lottery")
}

/// A field's name: given as text, or as an index into its metadata's
/// field names.
fn name<'a>(field: &'a Field, names: &'a [String]) -> Option<&'a str> {
    match field.name.as_ref()? {
        field::Name::StrName(name) => Some(name),
        field::Name::NameIdx(i) => names.get(*i as usize).map(String::as_str),
    }
}

/// Collects task names from the console's updates until `wanted` (each a
/// prefix) are all seen, or the limit passes.
async fn task_names(socket: &Path, wanted: &[&str]) -> BTreeSet<String> {
    let socket = socket.to_path_buf();
    // The URI is required and unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://console.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect to the console server");
    let mut client = InstrumentClient::new(channel);
    let mut updates = client
        .watch_updates(InstrumentRequest {})
        .await
        .expect("watch the console's updates")
        .into_inner();
    let mut field_names: std::collections::HashMap<u64, Vec<String>> = Default::default();
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !wanted
        .iter()
        .all(|w| seen.iter().any(|s: &String| s.starts_with(w)))
    {
        let update = tokio::time::timeout_at(deadline, updates.message())
            .await
            .unwrap_or_else(|_| panic!("saw only {seen:?} within {PATIENCE:?}"))
            .expect("a console update")
            .expect("the console's stream stays open");
        if let Some(metadata) = update.new_metadata {
            for new in metadata.metadata {
                if let (Some(id), Some(meta)) = (new.id, new.metadata) {
                    field_names.insert(id.id, meta.field_names);
                }
            }
        }
        for task in update.task_update.into_iter().flat_map(|u| u.new_tasks) {
            let names = task
                .metadata
                .and_then(|m| field_names.get(&m.id).cloned())
                .unwrap_or_default();
            for f in &task.fields {
                if name(f, &names) != Some("task.name") {
                    continue;
                }
                let value = match &f.value {
                    Some(field::Value::StrVal(v)) | Some(field::Value::DebugVal(v)) => v.clone(),
                    _ => continue,
                };
                seen.insert(value.trim_matches('"').to_string());
            }
        }
    }
    seen
}

#[test]
fn tokio_console_sees_the_central_s_named_tasks() {
    let bin = console_build();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("console.sock");
    let data = gen_data(GenOptions {
        agencies: 1,
        bets_per_agency: 500,
        seed: 4,
        winning_number: 7574,
        winner_share: 0.02,
        tricky_share: 0.0,
        crlf: false,
    });
    let mut cmd = lottery_at(&bin);
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", dir.path().join("bets.csv"))
        .env("SERVER_WINNING_NUMBER", "7574")
        .env("SERVER_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("LOTTERY_CONSOLE_SOCKET", &socket)
        .env("TOKIO_CONSOLE_PUBLISH_INTERVAL", "100ms");
    let server = Server::spawn(cmd);
    // A connection still open while the console looks, and one agency's
    // whole upload and draw before it.
    let _open = Raw::connect(&server.address());
    let winners = dir.path().join("winners.txt");
    let agency = start_agency(1, &server.address(), &data_file(data.path(), 1), &winners);
    assert!(agency.wait_exit(PATIENCE).success(), "{}", agency.output());
    server.proc.wait_for("action: sorteo | result: success");

    let wanted = [
        "listener",
        "conn 127.0.0.1:",
        "bets writer",
        "draw",
        "admin",
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let seen = runtime.block_on(task_names(&socket, &wanted));
    println!("tasks the console saw: {seen:?}");
    for w in wanted {
        assert!(seen.iter().any(|s| s.starts_with(w)), "{w} not in {seen:?}");
    }

    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    // The console's trace events never reach stdout.
    assert!(
        !server.proc.output().contains("runtime.spawn"),
        "{}",
        server.proc.output()
    );
}
