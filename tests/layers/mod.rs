//! The architecture as a test: the folders under `src/` are layers, and a file imports only the
//! base files and the layers below its own (README, Development). Read from the source text, so a
//! new upward `use` fails `make test` instead of waiting for a review.

use std::fs;
use std::path::{Path, PathBuf};

/// Bottom first. The base files (`error`, `units`, `stop`) sit under every layer.
const LAYERS: [&str; 7] = ["wire", "store", "flow", "net", "auth", "server", "local"];
const BASE: [&str; 3] = ["error", "units", "stop"];

fn rank(top: &str) -> Option<usize> {
    if BASE.contains(&top) {
        return Some(0);
    }
    LAYERS.iter().position(|l| *l == top).map(|i| i + 1)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its unit tests and comments (a doc may name any module).
fn code(p: &Path) -> String {
    let text = fs::read_to_string(p).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after each `crate::` (`crate::net::relay` → `net`).
fn crate_imports(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Every problem in the tree at `src`: upward imports, one proxy importing the other, a file
/// importing its own folder's `mod.rs`.
fn problems(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let parts: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
        let top = parts[0].trim_end_matches(".rs");
        let Some(own) = rank(top) else { continue }; // lib.rs, main.rs, signals.rs
        let code = code(&f);
        for to in crate_imports(&code) {
            let Some(theirs) = rank(&to) else { continue };
            if theirs > own || (theirs == own && to != top && own > 0) {
                found.push(format!("{} imports crate::{to}", rel.display()));
            }
        }
        // A child reaching into its parent's mod.rs (`crate::server::Shared`, `super::X`).
        if parts.len() == 2 && parts[1] != "mod.rs" {
            let siblings: Vec<String> = fs::read_dir(src.join(top))
                .unwrap()
                .map(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .collect();
            for (i, m) in code.match_indices(&format!("crate::{top}::")) {
                let next: String = code[i + m.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !siblings.contains(&next) {
                    found.push(format!(
                        "{} imports its parent: crate::{top}::{next}",
                        rel.display()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn no_file_imports_a_layer_above_its_own_or_its_parent() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = problems(&src);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// The check itself can fail: a wire file naming the server, a child naming its parent's state.
#[test]
fn the_layer_check_catches_an_upward_import_and_a_child_using_its_parent() {
    let dir = std::env::temp_dir().join(format!("sluice-layers-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("wire")).unwrap();
    fs::create_dir_all(dir.join("server")).unwrap();
    fs::write(
        dir.join("wire/http.rs"),
        "use crate::server::conn;\n// crate::local in a comment\n",
    )
    .unwrap();
    fs::write(
        dir.join("server/mod.rs"),
        "pub mod conn;\npub struct Shared;\n",
    )
    .unwrap();
    fs::write(
        dir.join("server/conn.rs"),
        "use crate::server::Shared;\nuse crate::wire::http;\n",
    )
    .unwrap();
    let found = problems(&dir);
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(
        found.len(),
        2,
        "expected the upward import and the parent import: {found:?}"
    );
    assert!(
        found
            .iter()
            .any(|f| f.contains("wire/http.rs imports crate::server"))
    );
    assert!(
        found
            .iter()
            .any(|f| f.contains("imports its parent: crate::server::Shared"))
    );
}
