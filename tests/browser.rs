//! The status page in a real headless browser (Debian's `chromium`), during
//! a real round: what it shows before, during and after the draw, with
//! JavaScript on and off, and the screenshot the README shows
//! (`LOTTERY_WRITE_DOCS=1` writes it to `docs/status-page.png`).
//!
//! Without `chromium` the test says it skipped, unless
//! `LOTTERY_REQUIRE_CHROMIUM` is set (CI sets it, and installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::{round, Stage, BETS};
use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

/// The browser, when this machine has one.
fn chromium(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("LOTTERY_REQUIRE_CHROMIUM").is_none(),
            "LOTTERY_REQUIRE_CHROMIUM is set but there is no chromium on PATH \
             (apt-get install chromium)"
        );
        skipped(test, "no chromium on PATH (apt-get install chromium)");
    }
    found
}

/// A browser profile in `dir`, with JavaScript on or off (off through the
/// profile's own content setting: the switches that turn scripts off also
/// stop the headless browser from dumping the page).
fn profile(dir: &Path, javascript: bool) -> PathBuf {
    let profile = dir.join(if javascript { "js-on" } else { "js-off" });
    std::fs::create_dir_all(profile.join("Default")).unwrap();
    if !javascript {
        std::fs::write(
            profile.join("Default/Preferences"),
            r#"{"profile":{"default_content_setting_values":{"javascript":2}}}"#,
        )
        .unwrap();
    }
    profile
}

/// Runs the headless browser on `url` with `args`, in `profile`.
fn browse(browser: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            // The page polls every second: give its script time to run.
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of the element with id `id` in a DOM dump.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no element #{id} in:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest.find('<').unwrap();
    &rest[start..end.max(start)]
}

/// Agency `id`'s row as its cells' text: agency, stored, finished,
/// connected, last seen, winners.
fn row(dom: &str, id: u32) -> Vec<String> {
    let open = format!("<tr id=\"agency-{id}\">");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no row of agency {id} in:\n{dom}"));
    let rest = &dom[at + open.len()..];
    let rest = &rest[..rest.find("</tr>").unwrap()];
    rest.split("</td>")
        .filter_map(|cell| cell.rsplit('>').next())
        .take(6)
        .map(|t| t.replace("–", "-"))
        .collect()
}

#[test]
fn the_status_page_in_a_real_browser_before_during_and_after_the_draw() {
    let test = "the_status_page_in_a_real_browser";
    let Some(browser) = chromium(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let profiles = tempfile::tempdir().unwrap();
    let (js_on, js_off) = (
        profile(profiles.path(), true),
        profile(profiles.path(), false),
    );
    let data = gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: BETS,
        seed: 22,
        winning_number: 7574,
        winner_share: 0.02,
        tricky_share: 0.05,
        crlf: false,
    });
    let expected = expected(data.path(), 2, 7574);
    let shot = dir.path().join("status-page.png");
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_STORAGE", dir.path().join("bets.csv"))
        .env("SERVER_WINNING_NUMBER", "7574");
    let server = round(cmd, data.path(), |stage, admin| {
        let url = format!("http://{admin}/");
        let dom = browse(&browser, &js_on, &["--dump-dom"], &url);
        // The script fetched the live part and swapped it in.
        assert!(dom.contains("<body data-live=\"polling\">"), "{dom}");
        // Without JavaScript: the same page, which refreshes itself.
        let plain = browse(&browser, &js_off, &["--dump-dom"], &url);
        assert!(plain.contains("<body>"), "{plain}");
        assert!(plain.contains("http-equiv=\"refresh\""), "{plain}");
        for dom in [&dom, &plain] {
            assert_eq!(row(dom, 1).len(), 6, "{dom}");
            match stage {
                Stage::Before => {
                    assert_eq!(text_of(dom, "draw-state"), "waiting");
                    assert_eq!(text_of(dom, "finished"), "0 of 3 agencies finished");
                    for id in 1..=3 {
                        assert_eq!(
                            row(dom, id)[..4],
                            [id.to_string(), "0".into(), "no".into(), "no".into()]
                        );
                    }
                }
                Stage::During => {
                    assert_eq!(text_of(dom, "draw-state"), "waiting");
                    assert_eq!(text_of(dom, "finished"), "1 of 3 agencies finished");
                    assert_eq!(row(dom, 3)[..4], ["3", "1", "yes", "yes"]);
                    assert_ne!(row(dom, 3)[4], "-", "agency 3 was seen");
                    assert_eq!(row(dom, 1)[..4], ["1", "0", "no", "no"]);
                }
                Stage::After => {
                    assert_eq!(text_of(dom, "draw-state"), "done");
                    for id in 1..=2u32 {
                        let cells = row(dom, id);
                        assert_eq!(cells[1], BETS.to_string());
                        assert_eq!(cells[2], "yes");
                        assert_eq!(cells[5], expected.winners[&id].len().to_string());
                    }
                    assert_eq!(row(dom, 3)[5], "1");
                }
            }
            // Never a bettor's document or name.
            assert!(!dom.contains("30904465") && !dom.contains("Perez"), "{dom}");
            for (agency, rows) in &expected.rows {
                for r in rows.iter().take(50) {
                    assert!(
                        !dom.contains(&format!(">{}<", r[3])),
                        "agency {agency}: {dom}"
                    );
                }
            }
        }
        if stage == Stage::After {
            let _ = browse(
                &browser,
                &js_on,
                &[
                    &format!("--screenshot={}", shot.display()),
                    "--window-size=1000,640",
                ],
                &url,
            );
        }
    });
    let log = server.proc.output();
    let seal = log
        .lines()
        .find(|l| l.contains("action: sorteo | result: success"))
        .and_then(|l| l.split(" | ").find_map(|f| f.strip_prefix("seal: ")))
        .expect("the draw's seal in the log")
        .to_string();
    let admin = common::admin::admin_address(&server);
    let dom = browse(
        &browser,
        &js_on,
        &["--dump-dom"],
        &format!("http://{admin}/"),
    );
    assert_eq!(text_of(&dom, "seal"), seal);

    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{}",
        png.len()
    );
    if std::env::var_os("LOTTERY_WRITE_DOCS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(docs, &png).unwrap();
    }
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}
