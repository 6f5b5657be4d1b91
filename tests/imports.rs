//! The imports run one way: the lower parts of the program never name the
//! ones above them, so each can be read (and changed) without the rest.
//! Read from the source itself, so a new file is held to it at once.

use std::fs;
use std::path::{Path, PathBuf};

/// Parts that must never name another, with why: (folder or file under
/// `src/`, the path it must not name, the reason).
const NEVER: &[(&str, &str, &str)] = &[
    (
        "store",
        "crate::config",
        "the store takes plain options (store::Options), never the settings",
    ),
    (
        "store/postgres",
        "store::file",
        "a backend never borrows the other's types: the seam owns what both use",
    ),
    (
        "lottery",
        "crate::wire",
        "the lottery's rules know no wire codes: the handler maps their refusals",
    ),
    (
        "tls",
        "crate::config",
        "TLS takes paths and names, never a component's settings",
    ),
];

/// Every `.rs` file at or under `path`.
fn sources(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(path).expect("the source folder can be read") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

/// The lines of `path` that name `forbidden`, outside comments.
fn offending(path: &Path, forbidden: &str) -> Vec<String> {
    let text = fs::read_to_string(path).expect("a source file can be read");
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let code = line.split("//").next().unwrap_or("");
            code.contains(forbidden)
        })
        .map(|(n, line)| format!("{}:{}: {}", path.display(), n + 1, line.trim()))
        .collect()
}

#[test]
fn the_lower_parts_never_import_the_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (part, forbidden, why) in NEVER {
        // `store` is `src/store.rs` or the folder `src/store/`.
        let files: Vec<PathBuf> = [src.join(part).with_extension("rs"), src.join(part)]
            .iter()
            .filter(|p| p.exists())
            .flat_map(|p| sources(p))
            .collect();
        assert!(!files.is_empty(), "src/{part} holds no source");
        for file in files {
            for line in offending(&file, forbidden) {
                broken.push(format!("{line}\n    ({why})"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the grain:\n{}",
        broken.join("\n")
    );
}

/// The top-level parts under `src/` each file of `src` names through
/// `crate::…`, outside comments and test modules: part -> parts it imports.
fn part_imports(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for file in sources(src) {
        let rel = file.strip_prefix(src).expect("under src");
        let part = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name")
            .trim_end_matches(".rs")
            .to_string();
        let text = fs::read_to_string(&file).expect("a source file can be read");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let targets = graph.entry(part.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != part {
                    targets.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn no_two_parts_import_each_other_even_through_others() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = part_imports(&src);
    // Depth-first, keeping the path: a part met again on its own path
    // closes a circle.
    fn visit(
        part: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == part) {
            let mut circle = path[at..].to_vec();
            circle.push(part.to_string());
            return Some(circle);
        }
        if !done.insert(part.to_string()) {
            return None;
        }
        path.push(part.to_string());
        for next in graph.get(part).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = std::collections::BTreeSet::new();
    for part in graph.keys() {
        let circle = visit(part, &graph, &mut Vec::new(), &mut done);
        assert!(
            circle.is_none(),
            "the parts under src/ import each other in a circle: {}",
            circle.unwrap_or_default().join(" -> ")
        );
    }
    // The check reads what it should: the server imports the lottery.
    assert!(graph["server"].contains("lottery"), "{graph:?}");
}
