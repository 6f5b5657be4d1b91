//! The README and docs/ as a newcomer meets them: the quick start's commands
//! run, every setting is documented from the one settings table, and what
//! the docs name (subcommands, make targets, files, sections) exists.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lottery::config::{Config, Role, SETTINGS};
use lottery::model::BetField;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The lines of the README section under `## title`, up to the next one.
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    let heading = format!("## {title}");
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    assert!(!lines.is_empty(), "no section {heading:?}");
    lines
}

/// `lottery --help`'s output (or a subcommand's), and whether it exited 0.
fn help(args: &[&str]) -> (bool, String) {
    let out = common::lottery().args(args).output().expect("run lottery");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------
// docs/CONFIGURATION.md

const BEGIN: &str = "<!-- generated from the settings table in src/config/settings.rs: begin -->";
const END: &str = "<!-- generated: end -->";
const REGENERATE: &str = "LOTTERY_WRITE_DOCS=1 cargo test --test docs configuration";

/// The settings table as markdown, one row per setting, in declaration
/// order (the order of `config.toml`).
fn settings_table() -> String {
    let defaults = Config::default();
    let mut out =
        String::from("| key | environment | flag | default | meaning |\n|---|---|---|---|---|\n");
    for s in SETTINGS {
        let env = match (s.env_var(Role::Server), s.env_var(Role::Agency)) {
            (None, None) => String::new(),
            (Some(a), Some(b)) if a == b => format!("`{a}`"),
            (server, agency) => [(server, "server"), (agency, "agency")]
                .iter()
                .filter_map(|(var, role)| var.map(|v| format!("`{v}` ({role})")))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let flag = match s.flag() {
            None => String::new(),
            Some(long) => match s.flag_on() {
                ["*"] => format!("`--{long}` (every command)"),
                on => format!("`--{long}` ({})", on.join(", ")),
            },
        };
        let value = s.value(&defaults);
        let default = match value.as_str() {
            "" => "`\"\"`".to_string(),
            "0 entries" => "empty".to_string(),
            v => format!("`{v}`"),
        };
        let mut meaning = s.help().replace('|', "\\|");
        match s.bounds() {
            (Some(min), Some(max)) => meaning.push_str(&format!(" ({min} to {max})")),
            (Some(min), None) if min > 1 => meaning.push_str(&format!(" (at least {min})")),
            (None, Some(max)) => meaning.push_str(&format!(" (at most {max})")),
            _ => {}
        }
        out.push_str(&format!(
            "| `{}` | {env} | {flag} | {default} | {meaning} |\n",
            s.key()
        ));
    }
    out
}

#[test]
fn configuration_md_is_the_settings_table_as_the_code_declares_it() {
    let path = root().join("docs/CONFIGURATION.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/CONFIGURATION.md lacks the markers {BEGIN:?} and {END:?}");
    };
    let committed = &text[start + BEGIN.len()..end];
    let generated = format!("\n{}", settings_table());
    if committed == generated {
        return;
    }
    if std::env::var_os("LOTTERY_WRITE_DOCS").is_some() {
        let new = format!("{}{BEGIN}{generated}{}", &text[..start], &text[end..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    let first = committed
        .lines()
        .zip(generated.lines())
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("\n  committed: {a}\n  generated: {b}"))
        .unwrap_or_default();
    panic!(
        "docs/CONFIGURATION.md differs from the settings table in src/config/settings.rs{first}\n\
         regenerate it with: {REGENERATE}"
    );
}

// ---------------------------------------------------------------------------
// README's quick start

/// Every `lottery <subcommand> [args]` in `lines`, as its arguments:
/// `lottery`, `./target/release/lottery` and `cargo run … -- ` alike, up to
/// the end of the shell command or of the inline code span.
fn lottery_commands(lines: &[&str]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for line in lines {
        // A shell comment is prose.
        let line = line.split(" #").next().unwrap();
        for prefix in ["lottery ", "cargo run --release -- "] {
            for (i, _) in line.match_indices(prefix) {
                let before = &line[..i];
                // `lottery` as the program: not a path's tail such as
                // `/var/lib/lottery`, but `./target/release/lottery` is.
                let program = before.is_empty()
                    || before.ends_with([' ', '`', '('])
                    || before.ends_with("target/release/");
                if !program {
                    continue;
                }
                let after = &line[i + prefix.len()..];
                let end = after
                    .find(['&', ';', '|', '`', '>', ')', '\\'])
                    .unwrap_or(after.len());
                let args: Vec<String> = after[..end].split_whitespace().map(String::from).collect();
                if args.first().is_some_and(|a| !a.starts_with('-')) {
                    found.push(args);
                }
            }
        }
    }
    found
}

#[test]
fn every_command_in_the_quick_start_parses_and_its_flags_exist() {
    let readme = read("README.md");
    let quick = section(&readme, "Quick start");
    let commands = lottery_commands(&quick);
    let subcommands: BTreeSet<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    // The quick start shows the demo and the pieces by hand; a reader who
    // finds one of them gone would find the rest untrustworthy too.
    for expected in ["demo", "gen-data", "secrets", "server", "agency", "winners"] {
        assert!(
            subcommands.contains(expected),
            "quick start: no `lottery {expected}` found in {commands:?}"
        );
    }
    for args in &commands {
        let mut with_help: Vec<&str> = args.iter().map(String::as_str).collect();
        with_help.push("--help");
        let (ok, text) = help(&with_help);
        assert!(
            ok,
            "README's quick start shows `lottery {}`, which does not parse:\n{text}",
            args.join(" ")
        );
        assert!(
            text.contains(&format!("Usage: lottery {}", args[0])),
            "{text}"
        );
        for flag in args
            .iter()
            .filter(|a| a.starts_with("--") && *a != "--help")
        {
            assert!(
                text.contains(&format!("{flag} ")),
                "`lottery {}`: no {flag} in its help:\n{text}",
                args[0]
            );
        }
    }
}

#[test]
fn the_quick_start_test_command_is_cargo_test() {
    // CI runs the README's test command; it is this one exactly.
    let readme = read("README.md");
    let quick = section(&readme, "Quick start");
    let tests: Vec<&str> = quick
        .iter()
        .filter(|l| l.starts_with("cargo test"))
        .copied()
        .collect();
    assert_eq!(tests.len(), 1, "{tests:?}");
    assert_eq!(tests[0].split('#').next().unwrap().trim(), "cargo test");
}

#[test]
fn the_command_table_lists_every_subcommand_and_no_other() {
    let readme = read("README.md");
    let listed: BTreeSet<String> = readme
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `lottery "))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    let (ok, text) = help(&["--help"]);
    assert!(ok, "{text}");
    let declared: BTreeSet<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect();
    assert!(!declared.is_empty(), "{text}");
    assert_eq!(
        listed, declared,
        "README's command table against `lottery --help`"
    );
}

#[test]
fn the_readme_stays_a_readme() {
    // The first screen and a map; the reference lives in docs/.
    let size = read("README.md").len();
    assert!(
        size <= 15_500,
        "README.md is {size} bytes: move reference text to docs/"
    );
}

// ---------------------------------------------------------------------------
// What the docs name exists

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// GitHub's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_link_between_the_docs_reaches_its_file_and_section() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for link in text.split("](").skip(1).filter_map(|l| l.split(')').next()) {
            if link.starts_with("http") {
                continue;
            }
            let (target, fragment) = link.split_once('#').unwrap_or((link, ""));
            let target = if target.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(target)
            };
            if !target.exists() {
                broken.push(format!("{name}: {link} (no such file)"));
            } else if !fragment.is_empty() && !anchors(&target).contains(fragment) {
                broken.push(format!("{name}: {link} (no such section)"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_make_target_the_docs_name_exists() {
    let makefile = read("Makefile");
    let targets: BTreeSet<&str> = makefile
        .lines()
        .filter(|l| !l.starts_with(['\t', '#', '.']) && !l.contains('='))
        .filter_map(|l| l.split_once(':').map(|(t, _)| t.trim()))
        .collect();
    let mut missing = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for named in text.split("make ").skip(1) {
            let target: String = named
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            // Prose ("make data", "make secrets") names targets too, but
            // only a target-like word right after `make ` that the Makefile
            // lacks is a mistake worth failing on when quoted as code.
            let quoted = text.contains(&format!("`make {target}"))
                || text.contains(&format!("\nmake {target}"));
            if quoted && !target.is_empty() && !targets.contains(target.as_str()) {
                missing.push(format!("{}: make {target}", file.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "no such make target: {missing:?} (the Makefile has {targets:?})"
    );
}

#[test]
fn the_data_file_section_names_the_fields_as_errors_do() {
    // An agency's error names the field by its wire key (`APELLIDO " ":
    // empty`); the README says which column that is.
    let readme = read("README.md");
    let row = readme
        .lines()
        .find(|l| l.starts_with("| named in errors |"))
        .expect("README: the data file's field table");
    let keys: Vec<&str> = row
        .split('|')
        .skip(2)
        .map(|c| c.trim().trim_matches('`'))
        .filter(|c| !c.is_empty())
        .collect();
    let csv_fields: Vec<&str> = BetField::ALL[..5].iter().map(|f| f.wire_key()).collect();
    assert_eq!(keys, csv_fields);
}

// ---------------------------------------------------------------------------
// Help texts that must say what the flag does

#[test]
fn no_sync_s_help_says_it_turns_syncing_off() {
    for sub in ["server", "demo"] {
        let (ok, text) = help(&[sub, "--help"]);
        assert!(ok, "{text}");
        let line = text
            .split("--no-sync")
            .nth(1)
            .unwrap_or_else(|| panic!("{sub}: no --no-sync"));
        let help = line.trim_start().lines().next().unwrap();
        assert!(
            help.starts_with("Acknowledge batches without syncing"),
            "{sub} --no-sync: {help}"
        );
    }
}

#[test]
fn gen_data_s_agencies_help_speaks_of_the_files_it_writes() {
    let (ok, text) = help(&["gen-data", "--help"]);
    assert!(ok, "{text}");
    let after = text
        .split("--agencies <N>")
        .nth(1)
        .expect("gen-data --agencies");
    let help = after.trim_start().lines().next().unwrap();
    assert!(
        help.starts_with("Number of files to write, agency-1.csv"),
        "{help}"
    );
    assert!(!help.contains("before the draw"), "{help}");
}

/// Every source file of `dir` (recursively), as text.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn every_test_testing_md_names_exists() {
    // Test names there are long snake_case words in backquotes.
    let testing = read("docs/TESTING.md");
    let mut code = String::new();
    sources(&root().join("tests"), &mut code);
    sources(&root().join("src"), &mut code);
    let missing: Vec<&str> = testing
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|name| {
            name.len() >= 25
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .filter(|name| !code.contains(&format!("fn {name}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/TESTING.md names tests that do not exist (renamed or removed?): {missing:?}"
    );
}

/// Every source path the README and docs/ name in backticks (`src/tls/`,
/// `store/file/row.rs`, `tests/postgres/`) is a file or folder of the
/// project: a moved or split file cannot leave the map behind. Paths are
/// looked for from the top, and under `src/` and `tests/`; a path is one
/// that starts at the top or at a part of `src/` (a name relative to the
/// line's folder, like `row.rs` after `src/store/file/`, is not checked).
#[test]
fn every_source_path_the_docs_name_exists() {
    const ROOTS: &[&str] = &[
        "src/", "tests/", "benches/", "docs/", "agency/", "config/", "lottery/", "model/",
        "server/", "store/", "tls/", "tools/", "wire/",
    ];
    let mut docs = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        let text = read(doc);
        for (i, quoted) in text.split('`').enumerate() {
            // Odd pieces are inside backticks.
            let looks_like_path = i % 2 == 1
                && quoted.contains('/')
                && (quoted.ends_with(".rs") || quoted.ends_with('/'))
                && quoted
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
                && !quoted.contains("..")
                && ROOTS.iter().any(|r| quoted.starts_with(r));
            if !looks_like_path {
                continue;
            }
            checked += 1;
            let found = ["", "src/", "tests/"]
                .iter()
                .any(|base| root().join(format!("{base}{quoted}")).exists());
            if !found {
                missing.push(format!("{doc}: `{quoted}`"));
            }
        }
    }
    assert!(checked > 20, "the docs name {checked} source paths");
    assert!(
        missing.is_empty(),
        "the docs name paths that do not exist (moved or split?):\n{}",
        missing.join("\n")
    );
}
