//! Data flows one way (ARCHITECTURE.md): the agent's modules must not import each other in a
//! circle. This reads the crate's sources and checks two graphs for cycles:
//! - between top-level modules (`crate::mirror` -> `crate::cluster` -> `crate::transfer` ...);
//! - between sibling files of one module directory (`gossip/rumor.rs` -> `gossip/summary.rs`).
//!
//! A child file using its parent's items (`super::Thing` defined in `mod.rs`) is one module's
//! privacy boundary and is not counted. Test code (`#[cfg(test)] mod tests` and `tests.rs`)
//! is left out: tests may reach anywhere.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module path (`["mirror", "server"]`) -> source without its test module.
fn sources(root: &Path) -> BTreeMap<Vec<String>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel: PathBuf = path.strip_prefix(root).expect("under src").with_extension("");
            let mut module: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            match module.last().map(String::as_str) {
                Some("mod") => {
                    module.pop();
                }
                Some("lib" | "main") if module.len() == 1 => continue,
                Some("tests") => continue,
                _ => {}
            }
            let src = std::fs::read_to_string(&path).expect("read source");
            out.insert(module, without_tests(&src));
        }
    }
    out
}

/// The source up to its `#[cfg(test)]` test module (always last in this crate's files).
fn without_tests(src: &str) -> String {
    let mut kept = String::new();
    let mut lines = src.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" && lines.peek().is_some_and(|n| n.trim_start().starts_with("mod tests")) {
            break;
        }
        // Comments name modules without importing them.
        let code = line.split("//").next().unwrap_or("");
        kept.push_str(code);
        kept.push('\n');
    }
    kept
}

/// Every path a source names that starts at `crate::` or `super::`, with `use` groups
/// (`crate::{a::{b, c}, d}`) expanded, as absolute module paths from the crate root.
fn referenced(module: &[String], src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (start, prefix_len, base) in starts(module, src) {
        expand(&src[start + prefix_len..], base, &mut out);
    }
    out
}

/// Positions where a `crate::` or `super::` path starts, with the absolute base it denotes.
fn starts(module: &[String], src: &str) -> Vec<(usize, usize, Vec<String>)> {
    let mut found = Vec::new();
    let bytes = src.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for (kw, up) in [("crate::", false), ("super::", true)] {
        let mut from = 0;
        while let Some(i) = src[from..].find(kw) {
            let at = from + i;
            from = at + kw.len();
            if at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            // `super` is the parent of the file's module (for `a/mod.rs`, module `a`, the root).
            let base = match up {
                false => Vec::new(),
                true => module[..module.len().saturating_sub(1)].to_vec(),
            };
            found.push((at, kw.len(), base));
        }
    }
    found
}

/// Expands one path body (after `crate::`/`super::`) onto `base`.
fn expand(rest: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        for item in split_group(group) {
            expand(item, base.clone(), out);
        }
        return;
    }
    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    if name.is_empty() || name == "self" {
        out.push(base);
        return;
    }
    let mut path = base;
    path.push(name.clone());
    let after = rest[name.len()..].trim_start();
    match after.strip_prefix("::") {
        Some(more) => expand(more, path, out),
        None => out.push(path),
    }
}

/// The comma-separated items of a `{...}` group (the text after its `{`), nesting respected.
fn split_group(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// The longest known module that is a prefix of `path`.
fn resolve(known: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| known.contains(p))
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// (top-level graph, per-directory sibling graphs)
fn graphs(root: &Path) -> (Graph, BTreeMap<String, Graph>) {
    let srcs = sources(root);
    let known: BTreeSet<Vec<String>> = srcs.keys().cloned().collect();
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut siblings: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, src) in &srcs {
        for path in referenced(module, src) {
            let Some(target) = resolve(&known, &path) else { continue };
            if target[0] != module[0] {
                top.entry(module[0].clone()).or_default().insert(target[0].clone());
            } else if module.len() >= 2 && target.len() == module.len() && target[..module.len() - 1] == module[..module.len() - 1] && target != *module {
                let dir = module[..module.len() - 1].join("/");
                siblings
                    .entry(dir)
                    .or_default()
                    .entry(module[module.len() - 1].clone())
                    .or_default()
                    .insert(target[target.len() - 1].clone());
            }
        }
    }
    (top, siblings)
}

#[test]
fn modules_import_each_other_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (top, siblings) = graphs(&root);
    // The check sees the edges it is meant to see (a parser that found nothing would pass).
    assert!(top.get("mirror").is_some_and(|t| t.contains("store")), "mirror -> store not found: {top:?}");
    assert!(top.get("cluster").is_some_and(|t| t.contains("transfer")), "cluster -> transfer not found: {top:?}");
    // The HTTP front end and the parsers under it stay generic: they import no other module.
    assert!(!top.contains_key("httpd"), "httpd imports {:?}", top.get("httpd"));
    assert!(!top.contains_key("metrics"), "metrics imports {:?}: each module renders its own", top.get("metrics"));
    let mut failures = Vec::new();
    if let Some(c) = find_cycle(&top) {
        failures.push(format!("top-level modules: {}", c.join(" -> ")));
    }
    for (dir, g) in &siblings {
        if let Some(c) = find_cycle(g) {
            failures.push(format!("{dir}/: {}", c.join(" -> ")));
        }
    }
    assert!(failures.is_empty(), "import cycles:\n{}\n\ntop-level graph: {top:#?}", failures.join("\n"));
}

#[test]
fn cycle_finder_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a; pub mod b; pub mod c;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod x; mod y;\nuse crate::{b::Thing, c};\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "use super::y::Y;\n").unwrap();
    std::fs::write(src.join("a/y.rs"), "use super::{x::{self, X}};\n#[cfg(test)]\nmod tests {\n use crate::c::Z;\n}\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct Thing;\nfn f() { crate::c::g() }\n").unwrap();
    std::fs::write(src.join("c.rs"), "// crate::a is named in a comment only\npub fn g() {}\n").unwrap();
    let (top, siblings) = graphs(src);
    assert_eq!(top.get("a").cloned().unwrap_or_default(), ["b", "c"].iter().map(|s| s.to_string()).collect());
    assert!(find_cycle(&top).is_none(), "{top:?}");
    let c = find_cycle(&siblings["a"]).expect("x <-> y");
    assert_eq!(c.len(), 3, "{c:?}");
    std::fs::write(src.join("c.rs"), "pub fn g() { crate::a::h() }\n").unwrap();
    let (top, _) = graphs(src);
    assert!(find_cycle(&top).is_some(), "a -> b -> c -> a: {top:?}");
}
