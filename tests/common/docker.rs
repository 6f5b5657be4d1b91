//! A real Docker engine for the container tests: the images built once per
//! test run with `docker/images` (no registry: the bases come from
//! debootstrap), and compose projects in temporary folders, brought down
//! and their volumes removed when the test ends.
//!
//! Tests skip with a visible `SKIPPED` line where no engine answers, and
//! fail instead when `LOTTERY_REQUIRE_DOCKER=1` (CI sets it).
//!
//! Network rules: containers reach each other by service name on the
//! project's own networks; the tests reach them only with `docker exec` and
//! `docker logs`, never through a bridge address.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::skipped;

pub const REQUIRE_VAR: &str = "LOTTERY_REQUIRE_DOCKER";

/// The test image of PostgreSQL (docker/postgres on a debootstrap base).
pub const POSTGRES_IMAGE: &str = "lottery-postgres:15";

/// The container names are fixed by the compose files (`server`,
/// `client1`, …), so one compose project runs at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `docker/images all`, once per test binary.
static IMAGES: OnceLock<Result<(), String>> = OnceLock::new();

/// The engine, with its compose tool, and the images built; `None` (after a
/// `SKIPPED` line) when no engine answers and [`REQUIRE_VAR`] is not `1`.
pub struct Engine {
    compose: Vec<String>,
    _turn: MutexGuard<'static, ()>,
}

impl Engine {
    pub fn start_or_skip(test: &str) -> Option<Engine> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let answers = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !answers {
            let why = "no Docker engine answers `docker version`";
            if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
                panic!("{test}: a Docker engine is required ({REQUIRE_VAR}=1) but {why}");
            }
            skipped(
                test,
                &format!("{why}; set {REQUIRE_VAR}=1 to make this a failure"),
            );
            return None;
        }
        let compose = if run_quiet(Command::new("docker").args(["compose", "version"])) {
            vec!["docker".to_string(), "compose".to_string()]
        } else {
            vec!["docker-compose".to_string()]
        };
        let built = IMAGES.get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/images");
            let out = Command::new(script)
                .arg("all")
                .env("IMAGES_QUIET", "1")
                .output()
                .map_err(|e| format!("running docker/images: {e}"))?;
            eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("docker/images failed ({})", out.status))
            }
        });
        if let Err(e) = built {
            panic!("{test}: {e}");
        }
        Some(Engine {
            compose,
            _turn: turn,
        })
    }

    /// A compose project in `dir` (which holds its compose.yaml), named
    /// `lottery{name}` (`name`: letters and digits) so that its networks and
    /// volumes are its own.
    pub fn project(&self, dir: &Path, name: &str) -> Project {
        let project = Project {
            compose: self.compose.clone(),
            dir: dir.to_path_buf(),
            name: format!("lottery{name}"),
        };
        // What a test killed before it could clean up goes first.
        let _ = project.compose(&["down", "--volumes", "--timeout", "1"]);
        project
    }
}

pub struct Project {
    compose: Vec<String>,
    pub dir: PathBuf,
    pub name: String,
}

impl Project {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .args(["--project-name", &self.name, "--project-directory"])
            .arg(&self.dir)
            .arg("--file")
            .arg(self.dir.join("compose.yaml"))
            .args(args)
            .env("LOTTERY_POSTGRES_IMAGE", POSTGRES_IMAGE)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the compose tool with `args`.
    pub fn compose(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .expect("running the compose tool")
    }

    /// Runs the compose tool with `args` and insists that it succeeds.
    pub fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "compose {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A named volume of this project, as the engine names it (project
    /// names here are letters and digits only, which every compose tool
    /// keeps as they are).
    pub fn volume(&self, name: &str) -> String {
        format!("{}_{name}", self.name)
    }

    /// A network of this project, as the engine names it.
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.name)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::env::var("LOTTERY_KEEP_CONTAINERS").as_deref() == Ok("1") {
            return;
        }
        let _ = self.compose(&["down", "--volumes", "--timeout", "1"]);
    }
}

fn run_quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker args…`, which must succeed; its standard output.
pub fn docker_ok(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker exec container args…`: its exit code and standard output.
pub fn exec(container: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("docker")
        .arg("exec")
        .arg(container)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A container's whole log (stdout and stderr).
pub fn logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .expect("running docker logs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// `docker inspect` of one field (a Go template).
pub fn inspect(container: &str, template: &str) -> String {
    docker_ok(&["inspect", "--format", template, container])
        .trim()
        .to_string()
}

/// Waits until `done` holds for the container's log, polling it (the
/// engine's log is the event); panics after `limit` naming what it waited
/// for.
pub fn wait_for_log(container: &str, what: &str, limit: Duration, done: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let text = logs(container);
        if done(&text) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{container}: waited {limit:?} for {what}; its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a container to exit and returns its exit code; panics after
/// `limit`.
pub fn wait_exit(container: &str, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if inspect(container, "{{.State.Status}}") == "exited" {
            return inspect(container, "{{.State.ExitCode}}").parse().unwrap();
        }
        assert!(
            start.elapsed() < limit,
            "{container} still running after {limit:?}; its log:\n{}",
            logs(container)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `cant_ganadores` an agency container logged with its winners.
pub fn winners_logged(container: &str) -> Option<usize> {
    logs(container)
        .lines()
        .find(|l| l.contains("action: consulta_ganadores | result: success"))
        .and_then(|l| l.rsplit("cant_ganadores: ").next())
        .and_then(|n| n.trim().parse().ok())
}
