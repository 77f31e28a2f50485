//! The config file: TOML whose keys are the long flag names (`mirror-addr = "..."`,
//! `registry = ["a=http://..."]`). Precedence: command line > `PEERD_*` environment > file. The
//! file is applied by exporting `PEERD_<KEY>` for keys the environment does not set yet, so clap
//! does all parsing and validation in one place.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: key {key}: {what}")]
    Value { path: String, key: String, what: &'static str },
    #[error("config file {path}: unknown key {key:?}{hint} (keys are the long names of `peerd agent --help`'s flags, e.g. mirror-addr)")]
    UnknownKey { path: String, key: String, hint: String },
}

/// The environment variable for a flag: `mirror-addr` -> `PEERD_MIRROR_ADDR`.
pub fn env_name(key: &str) -> String {
    format!("PEERD_{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// Reads `path` and returns `(variable, value)` pairs for every key. Lists join with commas (the
/// flags that repeat split their environment value on commas). A key that is not one of `known`
/// (the flags' long names) is an error: a misspelt setting silently ignored is a setting the
/// operator believes is in force.
pub fn load(path: &Path, known: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse { path: p.clone(), source })?;
    let mut out = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) {
            let close = known.iter().min_by_key(|k| edit_distance(k, &key)).filter(|k| edit_distance(k, &key) <= 3);
            let hint = close.map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
            return Err(ConfigError::UnknownKey { path: p, key, hint });
        }
        let scalar = |v: &toml::Value| -> Option<String> {
            match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(b) => Some(b.to_string()),
                _ => None,
            }
        };
        let bad = |what| ConfigError::Value { path: p.clone(), key: key.clone(), what };
        let v = match &value {
            toml::Value::Array(items) => {
                let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
                let parts = parts.ok_or_else(|| bad("lists may only hold strings, numbers or booleans"))?;
                if parts.iter().any(|s| s.contains(',')) {
                    return Err(bad("list items may not contain commas"));
                }
                parts.join(",")
            }
            v => scalar(v).ok_or_else(|| bad("must be a string, number, boolean or list"))?,
        };
        out.push((env_name(&key), v));
    }
    Ok(out)
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses sizes like `512MiB`, `10G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn file_to_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("peerd.toml");
        std::fs::write(&f, "mirror-addr = \"127.0.0.1:1\"\nregistry = [\"a=http://x\", \"b=http://y\"]\ntrust-cluster = true\n").unwrap();
        let known: Vec<String> = ["mirror-addr", "registry", "trust-cluster", "x"].iter().map(|s| s.to_string()).collect();
        let mut got = load(&f, &known).unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("PEERD_MIRROR_ADDR".into(), "127.0.0.1:1".into()),
                ("PEERD_REGISTRY".into(), "a=http://x,b=http://y".into()),
                ("PEERD_TRUST_CLUSTER".into(), "true".into()),
            ]
        );
        std::fs::write(&f, "x = { a = 1 }").unwrap();
        assert!(matches!(load(&f, &known), Err(ConfigError::Value { .. })));
        std::fs::write(&f, "not toml =").unwrap();
        assert!(matches!(load(&f, &known), Err(ConfigError::Parse { .. })));
        // A misspelt key is an error naming the key it was probably meant to be.
        std::fs::write(&f, "trust-clustr = true\n").unwrap();
        match load(&f, &known) {
            Err(e @ ConfigError::UnknownKey { .. }) => assert!(e.to_string().contains("did you mean \"trust-cluster\""), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
