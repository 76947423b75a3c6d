//! Dependencies point down: http → background → domain → upstream → state,
//! with ops and settings below them all. A module names (`crate::…`) only
//! its own layer and the layers under it; a name pointing up fails here.

use std::path::{Path, PathBuf};

/// The layers, top first, with the source paths (under `src/`) each holds.
const LAYERS: [(&str, &[&str]); 7] = [
    ("http", &["http"]),
    ("background", &["background"]),
    ("domain", &["domain"]),
    ("upstream", &["upstream"]),
    ("state", &["state"]),
    ("ops", &["ops"]),
    ("settings", &["settings", "secrets.rs"]),
];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.is_file() {
        out.push(dir.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layers a source text names in code (comments left out), as
/// `crate::<layer>` paths, grouped ones (`crate::{http::x, state::y}`,
/// across lines) included.
fn named_layers(text: &str) -> Vec<(usize, &'static str)> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    // The line of the first thing that is not white space from `at` on.
    let line_of = |at: usize| {
        let lead = code[at..].len() - code[at..].trim_start().len();
        code[..at + lead].matches('\n').count() + 1
    };
    let layer_at = |rest: &str| {
        let rest = rest.trim_start();
        LAYERS.iter().map(|(name, _)| *name).find(|name| {
            rest.starts_with(name)
                && !rest[name.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
        })
    };
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let start = at + "crate::".len();
        let rest = &code[start..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's items at its top level: each starts after `{` or `,`.
            let mut depth = 0usize;
            let mut item_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        if let Some(name) = layer_at(&group[item_start..i]) {
                            found.push((line_of(start + 1 + item_start), name));
                        }
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if let Some(name) = layer_at(&group[item_start..i]) {
                            found.push((line_of(start + 1 + item_start), name));
                        }
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
        } else if let Some(name) = layer_at(rest) {
            found.push((line_of(at), name));
        }
    }
    found
}

/// Every name in `src/` that points from a layer to one above it.
fn upward_names(root: &Path) -> Vec<String> {
    let rank = |layer: &str| LAYERS.iter().position(|(n, _)| *n == layer);
    let mut wrong = Vec::new();
    for (i, (layer, paths)) in LAYERS.iter().enumerate() {
        let mut files = Vec::new();
        for p in *paths {
            rust_files(&root.join(p), &mut files);
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, named) in named_layers(&text) {
                if rank(named).is_some_and(|r| r < i) {
                    wrong.push(format!(
                        "{}:{line}: {layer} names crate::{named}",
                        file.strip_prefix(root).unwrap_or(&file).display()
                    ));
                }
            }
        }
    }
    wrong
}

#[test]
fn no_module_names_a_layer_above_its_own() {
    let wrong = upward_names(&src());
    assert!(
        wrong.is_empty(),
        "imports pointing up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_name() {
    let dir = std::env::temp_dir().join(format!("gb-layers-{}", std::process::id()));
    let domain = dir.join("domain");
    std::fs::create_dir_all(&domain).unwrap();
    std::fs::write(
        domain.join("keys.rs"),
        "// crate::http in a comment is fine\nuse crate::state::StateStore;\nuse crate::http::error::ApiError;\n\
         use crate::{\n    state::now_ms,\n    http::pipeline::{self, Call},\n};\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("state").join("mod.rs"),
        "fn f() { crate::domain::keys::x(); }\n",
    )
    .unwrap();
    let mut wrong = upward_names(&dir);
    wrong.sort();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        wrong,
        [
            "domain/keys.rs:3: domain names crate::http",
            "domain/keys.rs:6: domain names crate::http",
            "state/mod.rs:1: state names crate::domain"
        ]
    );
}
