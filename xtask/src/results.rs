//! bench/RESULTS.md: each benchmark's table, with the date and the machine, replacing the
//! section of the same title.
use std::process::Command;

use anyhow::{Context, Result};

use crate::root;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {kernel}")
}

/// In a section, what follows this line is kept when the benchmark runs again (notes written by
/// hand: what the figures mean, earlier runs).
pub const KEEP: &str = "<!-- kept when the benchmark runs again -->";

/// Replaces (or appends) the section `## {title}` of bench/RESULTS.md, but for any part below
/// [`KEEP`].
pub fn record(title: &str, body: &str) -> Result<()> {
    let path = root().join("bench/RESULTS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| format!("# Benchmark results\n\nWritten by `cargo xtask bench ...`; each section is replaced when its benchmark runs again, except what follows a `{KEEP}` line in it (notes written by hand).\n"));
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let section = format!("## {title}\n\n{date}, {}.\n\n{}\n", machine(), body.trim_end());
    let new = replace_section(&old, title, section);
    std::fs::create_dir_all(path.parent().context("bench dir")?)?;
    std::fs::write(&path, new)?;
    println!("recorded in {}", path.display());
    Ok(())
}

/// `old` with the section `## {title}` replaced by `section` (appended if absent), keeping
/// whatever followed [`KEEP`] in the old section.
fn replace_section(old: &str, title: &str, mut section: String) -> String {
    let heading = format!("## {title}\n");
    match old.find(&heading) {
        Some(start) => {
            let rest = &old[start + heading.len()..];
            let end = rest.find("\n## ").map(|i| start + heading.len() + i + 1).unwrap_or(old.len());
            // Notes written by hand below the marker survive the new table.
            if let Some(kept) = old[start..end].find(KEEP).map(|i| &old[start + i..end]) {
                section = format!("{section}\n{}\n", kept.trim_end());
            }
            format!("{}{}\n{}", &old[..start], section, &old[end..]).trim_end().to_string() + "\n"
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_table_replaces_the_old_and_keeps_the_notes_below_the_marker() {
        let old = format!("# R\n\n## A\n\nold table\n\n{KEEP}\nwhat it means\n\n## B\n\nb\n");
        let new = replace_section(&old, "A", "## A\n\nnew table\n".into());
        assert_eq!(new, format!("# R\n\n## A\n\nnew table\n\n{KEEP}\nwhat it means\n\n## B\n\nb\n"));
        let plain = replace_section("# R\n\n## A\n\nold\n", "A", "## A\n\nnew\n".into());
        assert_eq!(plain, "# R\n\n## A\n\nnew\n");
        let added = replace_section("# R\n", "C", "## C\n\nc\n".into());
        assert_eq!(added, "# R\n\n## C\n\nc\n");
    }
}
