//! TLS between agencies and the central, with certificates made here
//! (`rcgen`): mutual TLS (the agency taken from its certificate), the wrong
//! kind of peer on either side named as such, and a self-signed certificate
//! given as its own authority (pinning).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WINNING: u16 = 7574;

/// A certificate authority made for the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { cert, key, pem }
    }

    /// A certificate for `names` (DNS names) signed by this authority, as
    /// (certificate, key) PEM files named after `stem`.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        write_pair(dir, stem, &cert, &key)
    }
}

/// A folder holding an authority (`ca.pem`) and the certificate and key
/// for `localhost` it issued the central (`server.pem`, `server.key`).
fn central_pki() -> (tempfile::TempDir, Ca, (PathBuf, PathBuf)) {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "ca");
    let central = ca.issue(pki.path(), "server", &["localhost"]);
    (pki, ca, central)
}

fn write_pair(
    dir: &Path,
    stem: &str,
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> (PathBuf, PathBuf) {
    let paths = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    paths
}

/// A `lottery server` for `agencies` agencies in `work`, with `env`.
fn server(work: &Path, agencies: u32, env: &[(&str, &Path)]) -> Server {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", agencies.to_string())
        .env("SERVER_WINNING_NUMBER", WINNING.to_string())
        .env("SERVER_STORAGE", work.join("bets.csv"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Server::spawn(cmd)
}

/// `lottery agency` number `id` against `address` with `env`; its data is
/// `data/agency-{id}.csv`, its winners go to `work/winners-{id}.txt`.
fn agency(id: u32, address: &str, data: &Path, work: &Path, env: &[(&str, &Path)]) -> Proc {
    let mut cmd = agency_command(
        id,
        address,
        &data_file(data, id),
        &work.join(format!("winners-{id}.txt")),
    );
    cmd.env("CLI_RECONNECT_TIMEOUT", "5");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(cmd)
}

/// Runs an agency that must stop at once (exit 1, no retrying) and
/// returns its stderr.
fn refused(agency: Proc) -> String {
    let status = agency.wait_exit(PATIENCE);
    assert_eq!(
        status.code(),
        Some(1),
        "{}\n{}",
        agency.output(),
        agency.stderr()
    );
    assert!(
        !agency.output().contains("result: in_progress"),
        "a refusal no retry can fix is not retried:\n{}",
        agency.output()
    );
    agency.stderr()
}

fn data(agencies: u32) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies,
        bets_per_agency: 500,
        seed: 12,
        winning_number: WINNING,
        winner_share: 0.02,
        tricky_share: 0.02,
        crlf: false,
    })
}

/// A hand-driven TLS connection.
type RawTls = Raw<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

impl RawTls {
    /// A connection to `address` presenting `identity`, trusting `ca`.
    fn connect_tls(address: &str, ca: &Path, identity: (&Path, &Path)) -> RawTls {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(identity.0)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(identity.1).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
        let tcp = TcpStream::connect(address).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        Raw::new(rustls::StreamOwned::new(conn, tcp))
    }

    fn peer(&self) -> String {
        format!("peer: {}", self.stream.sock.local_addr().unwrap())
    }
}

/// Mutual TLS: the central requires client certificates from its client
/// authority and takes the agency from the certificate. Secrets are on too,
/// and the agencies have none: their certificates authenticate them.
#[test]
fn mutual_tls_takes_the_agency_from_its_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    let server_ca = Ca::new(dir, "server-ca");
    let (server_cert, server_key) = server_ca.issue(dir, "server", &["localhost"]);
    let client_ca = Ca::new(dir, "agencies-ca");
    let one = client_ca.issue(dir, "agency-1", &["agency-1"]);
    let two = client_ca.issue(dir, "agency-2", &["agency-2"]);
    let impostor = Ca::new(dir, "impostor-ca").issue(dir, "impostor-2", &["agency-2"]);
    let secrets = dir.join("secrets.toml");
    // Random, as `lottery secrets` writes them (weaker ones are refused).
    std::fs::write(
        &secrets,
        "1 = \"0f3a5c7e9b1d2f4a6c8e0b2d4f6a8c1e\"\n2 = \"8e6c4a2f0d1b3f5a7c9e2b4d6f8a0c3e\"\n",
    )
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let data = data(2);
    let server = server(
        work.path(),
        2,
        &[
            ("SERVER_TLS_CERT", &server_cert),
            ("SERVER_TLS_KEY", &server_key),
            ("SERVER_TLS_CLIENT_CA", &client_ca.pem),
            ("SERVER_SECRETS_FILE", &secrets),
        ],
    );
    let listen = server
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: listen"))
        .unwrap();
    assert!(listen.contains("client_certificates: true"), "{listen}");
    let address = server.address();
    let tls_env = |cert: &(PathBuf, PathBuf)| -> Vec<(&'static str, PathBuf)> {
        vec![
            ("CLI_TLS_CA", server_ca.pem.clone()),
            ("CLI_TLS_SERVER_NAME", PathBuf::from("localhost")),
            ("CLI_TLS_CERT", cert.0.clone()),
            ("CLI_TLS_KEY", cert.1.clone()),
        ]
    };
    let run = |id: u32, env: Vec<(&'static str, PathBuf)>| {
        let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
        agency(id, &address, data.path(), work.path(), &env)
    };

    // Agency 2's certificate, presented as agency 1: refused at HELLO.
    let stderr = refused(run(1, tls_env(&two)));
    assert!(
        stderr.contains(
            "the central refused: UNAUTHENTICATED: the client certificate names agency 2, not agency 1"
        ),
        "{stderr}"
    );
    // The same with a batch or an announcement and no HELLO: refused, and
    // the connection closed.
    for payload in [
        "BATCH_SIZE:1|BET_1:NOMBRE:Eva\\|APELLIDO:Ruiz\\|DOCUMENTO:1\\|NACIMIENTO:1990-01-01\\|NUMERO:7574\\|AGENCY_ID:1\n",
        "ACTION:BETTING_FINISHED|AGENCY_ID:1\n",
    ] {
        let mut raw = RawTls::connect_tls(&address, &server_ca.pem, (&two.0, &two.1));
        raw.send(payload.as_bytes());
        assert_eq!(
            raw.recv().as_deref(),
            Some(
                "STATUS:ERROR|CODE:UNAUTHENTICATED|MESSAGE:the client certificate names agency 2, \
                 not agency 1\n"
            )
        );
        assert_eq!(raw.recv(), None, "closed after the refusal");
        let line = server.proc.wait_for(&raw.peer());
        assert!(
            line.contains("result: fail") && line.contains("code: UNAUTHENTICATED"),
            "{line}"
        );
    }

    // No certificate: the handshake fails, each side says why.
    let no_cert = vec![
        ("CLI_TLS_CA", server_ca.pem.clone()),
        ("CLI_TLS_SERVER_NAME", PathBuf::from("localhost")),
    ];
    let stderr = refused(run(1, no_cert));
    assert!(
        stderr.contains(
            "the central requires a client certificate: set agency.tls_cert and agency.tls_key"
        ),
        "{stderr}"
    );
    let line = server.proc.wait_for("the client presented no certificate");
    assert!(
        line.contains("result: fail") && line.contains("TLS handshake failed"),
        "{line}"
    );

    // A certificate from another authority, though it names agency 2.
    let stderr = refused(run(2, tls_env(&impostor)));
    assert!(
        stderr.contains("the central refused this agency's certificate"),
        "{stderr}"
    );
    let line = server.proc.wait_for(
        "the client's certificate is not signed by the authority in server.tls_client_ca",
    );
    assert!(line.contains("result: fail"), "{line}");

    // The right certificates: both agencies run to the end with no secret
    // and exactly their winners.
    let agencies = [run(1, tls_env(&one)), run(2, tls_env(&two))];
    let expected = expected(data.path(), 2, WINNING);
    for (i, agency) in agencies.iter().enumerate() {
        let id = i as u32 + 1;
        assert!(
            agency.wait_exit(PATIENCE).success(),
            "{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(
            read_winners(&work.path().join(format!("winners-{id}.txt"))),
            expected.winners[&id]
        );
        assert!(!expected.winners[&id].is_empty());
    }
    assert_eq!(stored(&work.path().join("bets.csv")), expected.rows);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    // The five refusals above are the only failures: an agency closing
    // without TLS's close_notify has just closed.
    let fails: Vec<String> = server
        .proc
        .lines()
        .into_iter()
        .filter(|l| l.contains("result: fail"))
        .collect();
    assert_eq!(fails.len(), 5, "{fails:#?}");
}

/// What any TLS server sends a client whose first bytes are not a TLS
/// handshake: a fatal alert record (`15 03 01 …`), here `decode_error`.
/// Read as a frame header, that is a frame of 352518916 bytes.
const TLS_ALERT: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x32];

/// A TLS-speaking peer that is not our central: it answers whatever comes
/// first with [`TLS_ALERT`] and hangs up.
fn alerting_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let mut buf = [0u8; 4096];
            if client.read(&mut buf).is_ok() {
                let _ = client.write_all(&TLS_ALERT);
            }
        }
    });
    address
}

/// A plain-text agency against our TLS central: the central answers in
/// plain text, `TLS_REQUIRED`, naming the setting; the agency stops at once
/// with that message.
#[test]
fn a_plain_text_agency_is_told_the_central_speaks_tls() {
    let (_pki, _ca, (cert, key)) = central_pki();
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let server = server(
        work.path(),
        1,
        &[("SERVER_TLS_CERT", &cert), ("SERVER_TLS_KEY", &key)],
    );
    let stderr = refused(agency(1, &server.address(), data.path(), work.path(), &[]));
    assert!(
        stderr.contains(
            "the central refused: TLS_REQUIRED: this central speaks only TLS: set agency.tls_ca \
             (CLI_TLS_CA)"
        ),
        "{stderr}"
    );
    let line = server.proc.wait_for("code: TLS_REQUIRED");
    assert!(
        line.contains("result: fail") && line.contains("a plain-text client on this TLS central"),
        "{line}"
    );
}

/// A TLS record where a frame header should be (another TLS server, or an
/// older central) is named for what it is, by the agency and by the
/// operator tools, not read as a 352518916-byte frame.
#[test]
fn a_tls_record_is_recognised_by_the_agency_and_the_tools() {
    let address = alerting_server();
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let stderr = refused(agency(1, &address, data.path(), work.path(), &[]));
    let hint = "the central speaks TLS: set agency.tls_ca (CLI_TLS_CA)";
    assert!(stderr.contains(hint), "{stderr}");
    assert!(!stderr.contains("352518916"), "{stderr}");
    for tool in ["health", "status"] {
        let mut cmd = lottery();
        cmd.args([tool, "--address", &address]);
        let probe = Proc::spawn(cmd);
        assert_eq!(probe.wait_exit(PATIENCE).code(), Some(1), "{tool}");
        assert!(probe.stderr().contains(hint), "{tool}: {}", probe.stderr());
    }
}

/// A TLS agency against a plain-text central: the central logs what came
/// and answers `TLS_UNAVAILABLE`; the agency's TLS stack cannot read that,
/// but the agency recognises a plain-text answer and says what to change.
#[test]
fn a_tls_agency_is_told_the_central_does_not_speak_tls() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "ca");
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let server = server(work.path(), 1, &[]);
    let name = PathBuf::from("localhost");
    let stderr = refused(agency(
        1,
        &server.address(),
        data.path(),
        work.path(),
        &[("CLI_TLS_CA", &ca.pem), ("CLI_TLS_SERVER_NAME", &name)],
    ));
    assert!(
        stderr.contains(
            "the central does not speak TLS (it answered in plain text): clear agency.tls_ca \
             (CLI_TLS_CA), or give the central server.tls_cert and server.tls_key"
        ),
        "{stderr}"
    );
    let line = server.proc.wait_for("the peer speaks TLS");
    assert!(line.contains("result: fail"), "{line}");

    // What a raw client sees on the wire: the answer, in plain text.
    let mut raw = TcpStream::connect(server.address()).unwrap();
    raw.set_read_timeout(Some(PATIENCE)).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0, 0, 1, 0])
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).unwrap();
    let payload = "STATUS:ERROR|CODE:TLS_UNAVAILABLE|MESSAGE:this central does not speak TLS: \
                   clear agency.tls_ca (CLI_TLS_CA), or give the central server.tls_cert and \
                   server.tls_key\n";
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(&common::raw::frame(payload.as_bytes()))
    );
}

/// A self-signed certificate for `localhost`, as (certificate, key) files;
/// `ca` marks it a CA too, as `openssl req -x509` does by default.
fn self_signed(dir: &Path, stem: &str, ca: bool, expired: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.self_signed(&key).unwrap();
    write_pair(dir, stem, &cert, &key)
}

/// A self-signed certificate given to the agency as its own authority is
/// pinned: the run completes with exactly its winners, whether or not the
/// certificate is also marked a CA. Another certificate, or an expired one,
/// is refused with what to give instead.
#[test]
fn a_self_signed_certificate_is_its_own_authority() {
    let pki = tempfile::tempdir().unwrap();
    let name = PathBuf::from("localhost");
    for ca in [false, true] {
        let (cert, key) = self_signed(pki.path(), &format!("central-{ca}"), ca, false);
        let work = tempfile::tempdir().unwrap();
        let data = data(1);
        let server = server(
            work.path(),
            1,
            &[("SERVER_TLS_CERT", &cert), ("SERVER_TLS_KEY", &key)],
        );
        let stranger = self_signed(pki.path(), &format!("stranger-{ca}"), ca, false).0;
        let stderr = refused(agency(
            1,
            &server.address(),
            data.path(),
            work.path(),
            &[("CLI_TLS_CA", &stranger), ("CLI_TLS_SERVER_NAME", &name)],
        ));
        let says = if ca {
            "the central presents a CA certificate as its own: give the central a certificate \
             signed by that CA, or put the central's exact certificate in agency.tls_ca \
             (CLI_TLS_CA) to pin it"
        } else {
            "the central's certificate is not signed by an authority in agency.tls_ca \
             (CLI_TLS_CA): give the authority (CA) certificate that signed it, or the \
             central's own certificate to pin it"
        };
        assert!(stderr.contains(says), "CA {ca}: {stderr}");
        assert_eq!(stderr.matches(says).count(), 1, "said once: {stderr}");
        let pinned = agency(
            1,
            &server.address(),
            data.path(),
            work.path(),
            &[("CLI_TLS_CA", &cert), ("CLI_TLS_SERVER_NAME", &name)],
        );
        assert!(
            pinned.wait_exit(PATIENCE).success(),
            "CA {ca}: {}",
            pinned.stderr()
        );
        assert_eq!(
            read_winners(&work.path().join("winners-1.txt")),
            expected(data.path(), 1, WINNING).winners[&1]
        );
        // The operator tools pin it too.
        let mut cmd = lottery();
        cmd.args(["health", "--address", &server.address()])
            .env("CLI_TLS_CA", &cert)
            .env("CLI_TLS_SERVER_NAME", &name);
        let health = Proc::spawn(cmd);
        assert!(health.wait_exit(PATIENCE).success(), "{}", health.stderr());
        // Only the stranger's connection failed, and the central says why;
        // the agency and the probe closing without TLS's close_notify is
        // no failure.
        server.proc.signal(Signal::SIGTERM);
        assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
        let fails: Vec<String> = server
            .proc
            .lines()
            .into_iter()
            .filter(|l| l.contains("result: fail"))
            .collect();
        assert_eq!(fails.len(), 1, "{fails:#?}\n{}", server.proc.output());
        assert!(
            fails[0].contains(
                "TLS handshake failed: the client does not trust this central's certificate"
            ),
            "{fails:#?}"
        );
    }

    // Pinning does not outlive the certificate.
    let (cert, key) = self_signed(pki.path(), "expired", false, true);
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let server = server(
        work.path(),
        1,
        &[("SERVER_TLS_CERT", &cert), ("SERVER_TLS_KEY", &key)],
    );
    let stderr = refused(agency(
        1,
        &server.address(),
        data.path(),
        work.path(),
        &[("CLI_TLS_CA", &cert), ("CLI_TLS_SERVER_NAME", &name)],
    ));
    assert!(
        stderr.contains("the central's certificate was refused: Expired"),
        "{stderr}"
    );
}

/// A certified agency's batches in flight are answered before the refusal
/// of a message naming another agency: replies keep request order.
#[test]
fn a_refusal_for_another_agency_keeps_reply_order() {
    let (pki, ca, (cert, key)) = central_pki();
    let dir = pki.path();
    let one = ca.issue(dir, "agency-1", &["agency-1"]);
    let work = tempfile::tempdir().unwrap();
    let server = server(
        work.path(),
        2,
        &[
            ("SERVER_TLS_CERT", &cert),
            ("SERVER_TLS_KEY", &key),
            ("SERVER_TLS_CLIENT_CA", &ca.pem),
        ],
    );
    let bet = |agency: u32| {
        format!(
            "BATCH_SIZE:1|BET_1:NOMBRE:Eva\\|APELLIDO:Ruiz\\|DOCUMENTO:1000000{agency}\\|\
             NACIMIENTO:1990-01-01\\|NUMERO:7574\\|AGENCY_ID:{agency}\n"
        )
    };
    let mut raw = RawTls::connect_tls(&server.address(), &ca.pem, (&one.0, &one.1));
    raw.send(b"ACTION:HELLO|AGENCY_ID:1\n");
    raw.send(bet(1).as_bytes());
    raw.send(bet(2).as_bytes());
    assert!(raw
        .recv()
        .unwrap()
        .starts_with("STATUS:SUCCESS|MESSAGE:agency 1: resume from bet 0"));
    assert_eq!(
        raw.recv().as_deref(),
        Some("STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:1\n")
    );
    assert_eq!(
        raw.recv().as_deref(),
        Some("STATUS:ERROR|CODE:UNAUTHENTICATED|MESSAGE:the client certificate names agency 1, not agency 2\n")
    );
    assert_eq!(raw.recv(), None);
    server.proc.wait_for(&raw.peer());
    let stored = stored(&work.path().join("bets.csv"));
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(stored[&1].len(), 1);
}

/// With several centrals, each is checked against its own name: the host
/// of the address actually dialled, not of the setting's first entry.
#[test]
fn the_certificate_name_follows_the_address_dialled() {
    let (_pki, ca, (cert, key)) = central_pki();
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let server = server(
        work.path(),
        1,
        &[("SERVER_TLS_CERT", &cert), ("SERVER_TLS_KEY", &key)],
    );
    // The first central, named by an IP address the certificate does not
    // carry, is down; the second is named `localhost`, which it does.
    let down = HeldPort::new();
    let list = format!("{},localhost:{}", down.address(), server.port);
    let agency = agency(
        1,
        &list,
        data.path(),
        work.path(),
        &[("CLI_TLS_CA", &ca.pem)],
    );
    assert!(
        agency.wait_exit(PATIENCE).success(),
        "{}\n{}",
        agency.output(),
        agency.stderr()
    );
    assert!(
        agency.output().contains(&format!(
            "action: connect | result: success | server_address: localhost:{}",
            server.port
        )),
        "{}",
        agency.output()
    );
    assert_eq!(
        read_winners(&work.path().join("winners-1.txt")),
        expected(data.path(), 1, WINNING).winners[&1]
    );
}

/// A TLS central at its connection limit says `SERVER_BUSY` in TLS: the
/// agency retries (it would give up on a plain-text answer, taking the
/// central for one that does not speak TLS) and gets in once a slot frees.
#[test]
fn a_busy_tls_central_says_so_in_tls_and_the_agency_retries() {
    let (_pki, ca, (cert, key)) = central_pki();
    let work = tempfile::tempdir().unwrap();
    let data = data(1);
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_WINNING_NUMBER", WINNING.to_string())
        .env("SERVER_STORAGE", work.path().join("bets.csv"))
        .env("SERVER_TLS_CERT", &cert)
        .env("SERVER_TLS_KEY", &key)
        .env("SERVER_MAX_CONNECTIONS", "1");
    let server = Server::spawn(cmd);
    // The only slot, held by a client that has not started its handshake.
    let holder = TcpStream::connect(server.address()).unwrap();
    let name = PathBuf::from("localhost");
    let agency = agency(
        1,
        &server.address(),
        data.path(),
        work.path(),
        &[("CLI_TLS_CA", &ca.pem), ("CLI_TLS_SERVER_NAME", &name)],
    );
    server
        .proc
        .wait_for("code: SERVER_BUSY | reason: connection limit reached");
    agency.wait_for("SERVER_BUSY");
    drop(holder);
    let status = agency.wait_exit(PATIENCE);
    assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
    assert!(
        !agency.stderr().contains("does not speak TLS"),
        "{}",
        agency.stderr()
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

/// A TLS central at its limit answers at most a few refusals by TLS at
/// once (16 handshakes); a connection beyond them is closed at once, not
/// handshaken: a flood of connections costs no CPU in handshakes.
#[test]
fn a_busy_tls_central_handshakes_only_a_few_refusals_at_once() {
    let (_pki, _ca, (cert, key)) = central_pki();
    let work = tempfile::tempdir().unwrap();
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", work.path().join("bets.csv"))
        .env("SERVER_TLS_CERT", &cert)
        .env("SERVER_TLS_KEY", &key)
        .env("SERVER_MAX_CONNECTIONS", "1")
        .env("SERVER_FRAME_TIMEOUT", "60");
    let server = Server::spawn(cmd);
    // The slot, then sixteen refusals waiting for a handshake that never
    // starts (each holds its place for the frame timeout, a minute).
    let held: Vec<TcpStream> = (0..17)
        .map(|_| TcpStream::connect(server.address()).unwrap())
        .collect();
    for _ in 0..16 {
        server.proc.wait_for("code: SERVER_BUSY");
    }
    let mut beyond = TcpStream::connect(server.address()).unwrap();
    beyond
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut byte = [0u8; 1];
    // Closed without a word, long before the frame timeout.
    assert_eq!(beyond.read(&mut byte).unwrap(), 0);
    drop(held);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}
