//! The README and the pages under docs/ hold together: every relative link
//! points at a file that exists, and every `#anchor` at a heading of its
//! target (GitHub's anchors); every code block says its language, so that
//! rustdoc, which compiles the README and docs/ as doctests, takes only the
//! `rust` ones for Rust; and the README stays a user's page (400 lines at
//! most), the depth in docs/.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// The lines outside code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut inside = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if !inside {
            lines.push(line);
        }
    }
    lines
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-`
/// and `_`), spaces as `-`; a repeated heading gets `-1`, `-2`...
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in prose(text) {
        let Some(heading) = line
            .strip_prefix('#')
            .map(|rest| rest.trim_start_matches('#'))
            .filter(|rest| rest.starts_with(' '))
        else {
            continue;
        };
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    seen
}

/// The targets of the inline links `[text](target)` outside code blocks
/// and code spans.
fn links(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose(text) {
        // Drop code spans, whose brackets are not links.
        let mut plain = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                plain.push(c);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        for target in links(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("a page's folder").join(file)
            };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", page.display()));
                continue;
            }
            if let Some(anchor) = anchor
                && !anchors(&read(&file)).contains(anchor)
            {
                broken.push(format!("{}: {target}: no such heading", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_code_block_names_its_language() {
    let mut bare = Vec::new();
    for page in pages() {
        let mut inside = false;
        for (n, line) in read(&page).lines().enumerate() {
            let Some(info) = line.trim_start().strip_prefix("```") else {
                continue;
            };
            if !inside && info.trim().is_empty() {
                bare.push(format!("{}:{}", page.display(), n + 1));
            }
            inside = !inside;
        }
        assert!(!inside, "{}: a code block is not closed", page.display());
    }
    assert!(
        bare.is_empty(),
        "code blocks without a language (rustdoc would compile them as Rust): {}",
        bare.join(", ")
    );
}

#[test]
fn the_readme_is_a_page_not_a_manual() {
    let lines = read(&root().join("README.md")).lines().count();
    assert!(
        lines <= 400,
        "README.md has {lines} lines: move the depth to docs/ (at most 400)"
    );
}

#[test]
fn every_docs_page_is_compiled_as_doctests() {
    let lib = read(&root().join("src/lib.rs"));
    for page in pages().iter().skip(1) {
        let name = page.file_name().expect("a page's name").to_string_lossy();
        assert!(
            lib.contains(&format!("include_str!(\"../docs/{name}\")")),
            "src/lib.rs does not include docs/{name} in its doctests (mod docs)"
        );
    }
}
