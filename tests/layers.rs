//! The top-level modules of `src/` form a DAG (issue 24): wire formats,
//! limits and clocks at the bottom, crypto and the HSM above them, then
//! the broker and the market, the CLI on top. A module that names
//! `crate::x` depends on `x`; a cycle between two top-level modules
//! fails here with the files that make it, before it can set in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `top` → the top-level modules its code (tests aside) names.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Identifiers right after each `crate::`, and inside `use crate::{…}`.
fn crate_refs(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                out.push(ident(part.trim()));
            }
        } else {
            out.push(ident(rest));
        }
    }
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let top = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| top(p))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut g = Graph::new();
    for f in &files {
        let from = top(f);
        if !modules.contains(&from) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        // Unit tests may reach anywhere; the code may not.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for to in crate_refs(code) {
            if modules.contains(&to) && to != from {
                let rel = f.strip_prefix(&src).unwrap().display().to_string();
                g.entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(rel);
            }
        }
    }
    g
}

/// A cycle through `start`, if there is one: the modules in order.
fn cycle_from(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_form_a_dag() {
    let g = graph();
    assert!(g.len() > 10, "the scan found the modules: {:?}", g.keys());
    for m in g.keys() {
        if let Some(cycle) = cycle_from(&g, m) {
            let mut why = String::new();
            for (i, a) in cycle.iter().enumerate() {
                let b = &cycle[(i + 1) % cycle.len()];
                why += &format!("\n  {a} -> {b}: {:?}", g[a][b]);
            }
            panic!("a cycle between top-level modules:{why}");
        }
    }
}

#[test]
fn the_scan_sees_a_cycle_when_there_is_one() {
    let refs = crate_refs("use crate::{proto::wire, exchange};\nlet t = crate::clock::now_ms();");
    assert_eq!(refs, ["proto", "exchange", "clock"]);
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into())
            .or_default()
            .entry(b.into())
            .or_default()
            .insert("f.rs".into());
    }
    assert_eq!(cycle_from(&g, "a").unwrap(), ["a", "b", "c"]);
    assert!(cycle_from(&g, "d").is_none());
}
