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

/// Replaces (or appends) the section `## {title}` of bench/RESULTS.md.
pub fn record(title: &str, body: &str) -> Result<()> {
    let path = root().join("bench/RESULTS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmark results\n\nWritten by `cargo xtask bench ...`; each section is replaced when its benchmark runs again.\n".into());
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let section = format!("## {title}\n\n{date}, {}.\n\n{}\n", machine(), body.trim_end());
    let heading = format!("## {title}\n");
    let new = match old.find(&heading) {
        Some(start) => {
            let rest = &old[start + heading.len()..];
            let end = rest.find("\n## ").map(|i| start + heading.len() + i + 1).unwrap_or(old.len());
            format!("{}{}\n{}", &old[..start], section, &old[end..]).trim_end().to_string() + "\n"
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::create_dir_all(path.parent().context("bench dir")?)?;
    std::fs::write(&path, new)?;
    println!("recorded in {}", path.display());
    Ok(())
}
