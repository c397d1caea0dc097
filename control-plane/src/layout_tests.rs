//! The module layout as a test: domains form a DAG and never reach the composition root.
//!
//! Reads every source file under `src/`, collects the top-level modules each one names
//! through `crate::...` (plain paths and `use crate::{a, b::c}` groups), and checks:
//! - only the composition root (`lib.rs`) names the `server` module;
//! - no module but the composition root (`lib.rs`, `server`, `state`, `metrics`) names
//!   `state`, `metrics` or `server`;
//! - the graph between the other top-level modules has no cycle.

#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

const ROOT: &[&str] = &["lib", "server", "state", "metrics"];

/// Top-level module named in `crate::...` paths of `src`.
fn crate_refs(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Comments (and doc links in them) are not imports.
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{..}, c}`: the identifiers at depth 1 that start an item.
            let mut depth = 1;
            let mut start = true;
            let mut ident = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && (ch.is_alphanumeric() || ch == '_') {
                    if start {
                        ident.push(ch);
                    }
                } else {
                    if !ident.is_empty() {
                        out.insert(std::mem::take(&mut ident));
                    }
                    if depth == 1 && ch == ',' {
                        start = true;
                    } else if !ch.is_whitespace() {
                        start = false;
                    }
                }
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

fn collect(dir: &Path, top: Option<&str>, graph: &mut BTreeMap<String, BTreeSet<String>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            if name != "bin" {
                collect(&path, Some(top.unwrap_or(&name)), graph);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || name == "layout_tests" {
            continue;
        }
        let module = top.unwrap_or(&name).to_owned();
        let refs = crate_refs(&std::fs::read_to_string(&path).unwrap());
        graph
            .entry(module.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != module));
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    collect(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut g,
    );
    g
}

#[test]
fn the_parser_reads_paths_and_groups() {
    let r = crate_refs(
        "use crate::{\n    http::{A, B},\n    keys,\n    pki::{self, X},\n};\nlet x = crate::models::f();",
    );
    let want: BTreeSet<String> = ["http", "keys", "pki", "models"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(r, want);
}

#[test]
fn only_the_composition_root_names_the_server_state_and_metrics() {
    for (module, refs) in graph() {
        if ROOT.contains(&module.as_str()) {
            if module != "lib" {
                assert!(!refs.contains("server"), "{module} names the server module");
            }
            continue;
        }
        for root in ["server", "state", "metrics"] {
            assert!(
                !refs.contains(root),
                "{module} names crate::{root}: domains reach each other and the state only \
                 through FromRef substates and named functions"
            );
        }
    }
}

#[test]
fn modules_below_the_composition_root_form_a_dag() {
    let g: BTreeMap<String, BTreeSet<String>> = graph()
        .into_iter()
        .filter(|(m, _)| !ROOT.contains(&m.as_str()))
        .collect();
    // Kahn's algorithm: repeatedly remove modules that depend on nothing left.
    let mut left = g.clone();
    let mut order = Vec::new();
    loop {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if ready.is_empty() {
            break;
        }
        for m in ready {
            left.remove(&m);
            order.push(m);
        }
    }
    assert!(
        left.is_empty(),
        "import cycle among {:?} (dependencies: {:?})",
        left.keys().collect::<Vec<_>>(),
        left
    );
    assert!(order.contains(&"telemetry".to_owned()) && order.contains(&"agent_api".to_owned()));
}
