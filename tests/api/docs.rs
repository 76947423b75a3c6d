//! The README, SECURITY.md and ARCHITECTURE.md are promises; these checks
//! keep them tied to the suite and the tree: every configuration variable in
//! the README's table is set by some test, every metric the README names is
//! observed by some test, every test SECURITY.md names exists, and every
//! path ARCHITECTURE.md names is in the tree.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every test source: the integration and end-to-end suites, and the unit
/// tests inside `src/` (the part of a file after `#[cfg(test)]`).
fn test_sources() -> String {
    let mut out = String::new();
    let mut stack = vec![root().join("tests"), root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.to_string_lossy().to_string();
            if path.file_name().is_some_and(|n| n == "docs.rs") && name.contains("tests") {
                continue; // this file names everything it checks
            }
            let text = match path.extension().and_then(|e| e.to_str()) {
                Some("rs" | "py") => read(&path),
                _ => continue,
            };
            if name.contains(&format!("{}src", std::path::MAIN_SEPARATOR)) {
                if let Some(at) = text.find("#[cfg(test)]") {
                    out.push_str(&text[at..]);
                }
            } else {
                out.push_str(&text);
            }
            out.push('\n');
        }
    }
    out
}

/// Backticked words of `text` that start with `prefix` and continue with
/// `[A-Za-z0-9_]`.
fn names(text: &str, prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = text
        .match_indices(prefix)
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| n.len() > prefix.len())
        .collect();
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_readme_variable_is_set_by_a_test() {
    let readme = read(&root().join("README.md"));
    let table: String = readme
        .lines()
        .filter(|l| l.starts_with("| `GB_"))
        .collect::<Vec<_>>()
        .join("\n");
    let vars = names(&table, "GB_");
    assert!(vars.len() >= 20, "the README's table was found: {vars:?}");
    let tests = test_sources();
    let untested: Vec<&String> = vars.iter().filter(|v| !assigned(&tests, v)).collect();
    assert!(
        untested.is_empty(),
        "README variables no test sets: {untested:?}"
    );
}

/// Whether `text` gives the variable `var` a value somewhere, rather than
/// only naming it: `GB_X=…` (an env file, a shell line), `("GB_X", …)` and
/// `.env("GB_X", …)` (Rust), `"GB_X": …` and `env["GB_X"] = …` (Python).
fn assigned(text: &str, var: &str) -> bool {
    text.match_indices(var).any(|(at, _)| {
        let head = &text[..at];
        let after = &text[at + var.len()..];
        let whole = !head.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        // The first thing of a pair, a value after it: `("GB_X", v)`.
        let pair = (head.ends_with("(\"") || head.ends_with("('"))
            && ["\",", "',", "\".into(),", "\".to_string(),"]
                .iter()
                .filter_map(|sep| after.strip_prefix(sep))
                .any(|rest| !rest.trim_start().starts_with(')'));
        let key = (head.ends_with('"') && after.starts_with("\":"))
            || (head.ends_with('\'') && after.starts_with("':"))
            || (head.ends_with("[\"") && after.starts_with("\"] ="))
            || (head.ends_with("['") && after.starts_with("'] ="));
        whole && (after.starts_with('=') || pair || key)
    })
}

#[test]
fn a_variable_only_named_by_a_test_is_not_counted_as_set() {
    let var = "GB_SOME_SETTING";
    for set in [
        "(\"GB_SOME_SETTING\", \"3\")",
        ".env(\"GB_SOME_SETTING\", &v)",
        "(\"GB_SOME_SETTING\".into(), \"x\".into())",
        "{\"GB_SOME_SETTING\": \"1\"}",
        "env['GB_SOME_SETTING'] = '1'",
        "GB_SOME_SETTING=1 cargo run",
    ] {
        assert!(assigned(set, var), "{set}");
    }
    for named in [
        "assert_eq!(e.var, \"GB_SOME_SETTING\");",
        "nearest(\"GB_SOME_SETTING\")",
        "// GB_SOME_SETTING is read at start",
        "[\"GB_SOME_SETTING\"]",
        "(\"GB_SOME_SETTING_MORE\", \"1\")",
        "\"GB_SOME_SETTING\", ]",
    ] {
        assert!(!assigned(named, var), "{named}");
    }
}

#[test]
fn every_readme_metric_is_observed_by_a_test() {
    let readme = read(&root().join("README.md"));
    let metrics = names(&readme, "gb_");
    assert!(
        metrics.len() >= 10,
        "the README's metrics were found: {metrics:?}"
    );
    let tests = test_sources();
    let unobserved: Vec<&String> = metrics
        .iter()
        .filter(|m| !tests.contains(m.as_str()))
        .collect();
    assert!(
        unobserved.is_empty(),
        "README metrics no test observes: {unobserved:?}"
    );
}

#[test]
fn every_test_security_md_names_exists() {
    let security = read(&root().join("SECURITY.md"));
    let guarantees: Vec<&str> = security
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| who") && !l.starts_with("|---"))
        .collect();
    assert!(guarantees.len() >= 5);
    let tests = test_sources();
    for row in guarantees {
        let named: Vec<&str> = row
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("tests/") || s.contains("::"))
            .collect();
        assert!(!named.is_empty(), "a guarantee names no test: {row}");
        for n in named {
            if let Some(file) = n
                .strip_prefix("tests/")
                .map(|_| n)
                .filter(|n| !n.contains("::"))
            {
                assert!(
                    root().join(file).exists(),
                    "{file} named in SECURITY.md does not exist"
                );
            } else {
                let (file, test) = n.rsplit_once("::").unwrap();
                let path = root().join(file);
                assert!(path.exists(), "{file} named in SECURITY.md does not exist");
                assert!(
                    read(&path).contains(&format!("fn {test}(")),
                    "{test} named in SECURITY.md is not a test in {file}"
                );
            }
        }
    }
    assert!(!tests.is_empty());
}

/// The names the gateway reads, from the list its settings loader uses.
fn gateway_variables() -> Vec<&'static str> {
    gemini_balancer::settings::VARIABLES
        .iter()
        .filter(|g| g.read_by_gateway)
        .flat_map(|g| g.vars.iter().copied())
        .collect()
}

#[test]
fn the_readme_table_lists_exactly_the_variables_the_gateway_reads() {
    let readme = read(&root().join("README.md"));
    let table: String = readme
        .lines()
        .filter(|l| l.starts_with("| `GB_"))
        .collect::<Vec<_>>()
        .join("\n");
    let in_table = names(&table, "GB_");
    let read = gateway_variables();
    for var in &read {
        // The file layered under the environment is described above the
        // table, not in it.
        let documented = if *var == "GB_CONFIG" {
            readme.contains("`GB_CONFIG`")
        } else {
            in_table.iter().any(|v| v == var)
        };
        assert!(
            documented,
            "{var} is read by the gateway but not in the README's table"
        );
    }
    for var in &in_table {
        assert!(
            read.contains(&var.as_str()),
            "{var} is in the README's table but the gateway does not read it"
        );
    }
}

/// Text files outside the gateway's code: scripts, compose files,
/// manifests, the e2e and container tests, the benches, the docs.
fn tool_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = ["scripts", "bench", "k8s", "deploy", "config", ".ci"]
        .iter()
        .chain(&["tests/e2e", "tests/container"])
        .map(|d| root().join(d))
        .collect();
    for entry in std::fs::read_dir(root()).unwrap().flatten() {
        if entry.path().is_file() {
            files.push(entry.path());
        }
    }
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.retain(|p| p.extension().is_none_or(|e| e != "rs" && e != "lock"));
    files
}

/// A shell that exports a `GB_*` name for a script or compose file also
/// hands it to the gateways the script starts: every such name must be
/// known to the gateway, or it warns about it. And every name listed for
/// the tools is still used by one.
#[test]
fn every_gb_name_the_tools_use_is_known_to_the_gateway() {
    use gemini_balancer::settings::{known_variables, VARIABLES};
    let known: Vec<&str> = known_variables().collect();
    let mut used = Vec::new();
    for file in tool_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // not text
        };
        for name in names(&text, "GB_") {
            assert!(
                known.contains(&name.as_str()),
                "{name} in {} is not known to the gateway (settings::VARIABLES)",
                file.display()
            );
            used.push(name);
        }
    }
    let tools = VARIABLES.iter().filter(|g| !g.read_by_gateway);
    for var in tools.flat_map(|g| g.vars.iter()) {
        assert!(
            used.iter().any(|u| u == var),
            "{var} is listed for the tools but none uses it"
        );
    }
}

/// Where a path `ARCHITECTURE.md` names may start: the repository's folders,
/// and (for the diagram) the folders of `src/`. Fixed here, so a folder that
/// disappears makes its mentions fail instead of no longer looking like paths.
const ROOT_DIRS: [&str; 10] = [
    "src",
    "dev",
    "tests",
    "bench",
    "migrations",
    "scripts",
    "deploy",
    "k8s",
    "config",
    ".ci",
];
const SRC_DIRS: [&str; 6] = ["background", "domain", "http", "ops", "state", "upstream"];
const EXTENSIONS: [&str; 8] = ["rs", "md", "toml", "lua", "py", "yml", "yaml", "json"];

/// The paths `text` names, as written: words that start with one of
/// [`ROOT_DIRS`] or [`SRC_DIRS`] and a `/`, or that end in one of
/// [`EXTENSIONS`]. `file::item` names an item of a Rust file.
fn named_paths(text: &str) -> Vec<String> {
    let mut found: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || "_./:-".contains(c)))
        .map(|w| w.trim_end_matches(['.', ',', ':']))
        .filter(|w| {
            let (path, _) = w.split_once("::").unwrap_or((w, ""));
            let first = path.split('/').next().unwrap_or("");
            let dir =
                path.contains('/') && (ROOT_DIRS.contains(&first) || SRC_DIRS.contains(&first));
            let file = path
                .rsplit_once('.')
                .is_some_and(|(stem, ext)| !stem.is_empty() && EXTENSIONS.contains(&ext));
            dir || file
        })
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The names of [`named_paths`] that do not exist: no such file or folder
/// (at the root, or under `src/`), or no such item in the file.
fn missing_paths(text: &str) -> Vec<String> {
    let exists = |path: &str| {
        let path = path.trim_end_matches('/');
        [root().join(path), root().join("src").join(path)]
            .into_iter()
            .find(|p| p.exists())
    };
    named_paths(text)
        .into_iter()
        .filter(|name| {
            let (path, item) = name.split_once("::").unwrap_or((name, ""));
            match exists(path) {
                None => true,
                Some(_) if item.is_empty() => false,
                Some(file) => {
                    let source = std::fs::read_to_string(file).unwrap_or_default();
                    !["fn", "struct", "enum", "trait", "const", "mod", "type"]
                        .iter()
                        .any(|kind| {
                            source.contains(&format!("{kind} {item}(")) // fn
                                || source.contains(&format!("{kind} {item} "))
                                || source.contains(&format!("{kind} {item}<"))
                                || source.contains(&format!("{kind} {item}:"))
                                || source.contains(&format!("{kind} {item};"))
                        })
                }
            }
        })
        .collect()
}

#[test]
fn every_path_architecture_md_names_exists() {
    let doc = read(&root().join("ARCHITECTURE.md"));
    let named = named_paths(&doc);
    assert!(named.len() >= 40, "the paths were found: {named:?}");
    let missing = missing_paths(&doc);
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn the_path_check_notices_what_is_gone() {
    assert_eq!(
        missing_paths("`src/lib.rs`, `src/nowhere.rs`, `tests/api` and `bench/`."),
        ["src/nowhere.rs"]
    );
    assert_eq!(
        missing_paths("in the diagram: http/pipeline/mod.rs, domain/gone.rs"),
        ["domain/gone.rs"]
    );
    assert_eq!(
        missing_paths("`src/http/routes/mod.rs::dispatch`, `src/http/routes/mod.rs::nothing`"),
        ["src/http/routes/mod.rs::nothing"]
    );
    assert_eq!(
        missing_paths("`NOWHERE.md` and `README.md`"),
        ["NOWHERE.md"]
    );
    assert!(missing_paths("/v1beta/models, HTTP/1.1, e.g. and/or").is_empty());
}

/// The route table's rows, and those whose hook cells (resolve, respond)
/// name a hook none of the row's files uses: `(row's first cell, name)`. A
/// hook is matched with its last qualifier (`Resolve::Owner` must be written
/// `Resolve::Owner`, `pipeline::pin` called as `pipeline::pin(`), so a name
/// elsewhere does not count.
fn unhooked_rows(doc: &str) -> (usize, Vec<(String, String)>) {
    let (_, table) = doc
        .split_once("| route | resolve | respond | after the answer | count |")
        .expect("ARCHITECTURE.md has the route table's header");
    let mut rows = 0;
    let mut wrong = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        rows += 1;
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let route = cells[1];
        let files: Vec<String> = route
            .split('`')
            .filter(|w| w.starts_with("src/") && w.ends_with(".rs"))
            .map(|f| read(&root().join(f)))
            .collect();
        assert!(!files.is_empty(), "route row without a file: {row}");
        for name in [cells[2], cells[3]]
            .iter()
            .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        {
            let parts: Vec<&str> = name.rsplitn(3, "::").collect();
            let used = match parts.as_slice() {
                [item, module, ..] if item.starts_with(char::is_lowercase) => {
                    format!("{module}::{item}(")
                }
                [item, module, ..] => format!("{module}::{item}"),
                _ => format!("{name}("),
            };
            if !files.iter().any(|f| f.contains(&used)) {
                wrong.push((route.to_string(), name.to_string()));
            }
        }
    }
    (rows, wrong)
}

#[test]
fn every_route_row_names_the_hooks_its_files_declare() {
    let doc = read(&root().join("ARCHITECTURE.md"));
    let (rows, wrong) = unhooked_rows(&doc);
    assert!(rows >= 9, "the route table has {rows} rows");
    assert!(
        wrong.is_empty(),
        "ARCHITECTURE.md's route table names a hook its files do not use: {wrong:?}"
    );
    // The check reads the cells: a hook the file does not declare is seen.
    let stale = "| route | resolve | respond | after the answer | count |\n|---|---|---|---|---|\n\
                 | uploads (`src/http/routes/store_upload.rs`) | `Resolve::Routed` | `Respond::Read` | – | read |\n";
    assert_eq!(
        unhooked_rows(stale).1,
        [(
            "uploads (`src/http/routes/store_upload.rs`)".to_string(),
            "Resolve::Routed".to_string()
        )]
    );
}
