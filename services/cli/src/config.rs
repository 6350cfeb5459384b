//! Where the API is and which key to use. Precedence: `--endpoint` / `--api-key`, then the
//! `CAPSA_ENDPOINT` / `CAPSA_API_KEY` environment (both handled by clap), then an env file:
//! the one named by `--env-file` / `CAPSA_ENV_FILE`, else `.capsa/dev.env` in the current
//! directory (written by the dev setup). Never a parent directory's: whoever can write a
//! parent (a shared /tmp, a cloned repo) could otherwise point the CLI, and the key it
//! sends, at a server of theirs.
//!
//! `dev.env` is `KEY=VALUE` lines; blank lines and `#` comments are skipped, an `export `
//! prefix and surrounding quotes are accepted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::CliError;

/// A resolved connection target. The key is redacted in `Debug`.
#[derive(Clone)]
pub struct Target {
    pub endpoint: String,
    pub api_key: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("endpoint", &self.endpoint)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// Parses the text of a `dev.env` file.
pub fn parse_dev_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.trim().to_string(), value.to_string()))
        })
        .collect()
}

/// `.capsa/dev.env` in `cwd`, if there is one.
pub fn find_dev_env(cwd: &Path) -> Option<PathBuf> {
    Some(cwd.join(".capsa").join("dev.env")).filter(|p| p.is_file())
}

/// Resolves the target from what clap gathered (flags or environment) and, for whatever is
/// still missing, the env file (`env_file`, which must exist, else `cwd/.capsa/dev.env`).
pub fn resolve(
    endpoint: Option<String>,
    api_key: Option<String>,
    env_file: Option<&Path>,
    cwd: &Path,
) -> Result<Target, CliError> {
    let file = if endpoint.is_none() || api_key.is_none() {
        env_file
            .map(Path::to_path_buf)
            .or_else(|| find_dev_env(cwd))
            .map(|path| {
                std::fs::read_to_string(&path)
                    .map(|text| parse_dev_env(&text))
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
            })
            .transpose()?
            .unwrap_or_default()
    } else {
        HashMap::new()
    };
    let endpoint = endpoint
        .or_else(|| file.get("CAPSA_ENDPOINT").cloned())
        .ok_or_else(|| {
            CliError::Usage(
                "no endpoint: pass --endpoint, set CAPSA_ENDPOINT, pass --env-file, or run from the directory holding .capsa/dev.env".into(),
            )
        })?;
    let api_key = api_key
        .or_else(|| file.get("CAPSA_API_KEY").cloned())
        .ok_or_else(|| {
            CliError::Usage(
                "no API key: pass --api-key, set CAPSA_API_KEY, pass --env-file, or run from the directory holding .capsa/dev.env".into(),
            )
        })?;
    let endpoint = if endpoint.contains("://") {
        endpoint
    } else {
        format!("http://{endpoint}")
    };
    Ok(Target { endpoint, api_key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_env_lines() {
        let env = parse_dev_env(
            "# written by make dev\n\nCAPSA_ENDPOINT=127.0.0.1:50051\nexport CAPSA_API_KEY=\"ck_123\"\nOTHER='x=y'\nnot a pair\n",
        );
        assert_eq!(env["CAPSA_ENDPOINT"], "127.0.0.1:50051");
        assert_eq!(env["CAPSA_API_KEY"], "ck_123");
        assert_eq!(env["OTHER"], "x=y");
        assert_eq!(env.len(), 3);
    }

    #[test]
    fn the_cwd_dev_env_fills_the_gaps_and_a_parent_one_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(".capsa")).unwrap();
        std::fs::write(
            root.path().join(".capsa/dev.env"),
            "CAPSA_ENDPOINT=10.0.0.1:1\nCAPSA_API_KEY=from-file\n",
        )
        .unwrap();
        let deep = root.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();

        let t = resolve(None, None, None, root.path()).unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.api_key.as_str()),
            ("http://10.0.0.1:1", "from-file")
        );
        // Below it, the parent's file is not trusted: nothing is configured.
        let err = resolve(None, None, None, &deep).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(ref m) if m.contains("no endpoint")),
            "{err}"
        );
        // Unless named explicitly.
        let named = root.path().join(".capsa/dev.env");
        let t = resolve(None, None, Some(&named), &deep).unwrap();
        assert_eq!(t.api_key, "from-file");
        // A named file that does not exist is an error, not a silent fallback.
        let err = resolve(None, None, Some(&deep.join("nope.env")), root.path()).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(ref m) if m.contains("nope.env")),
            "{err}"
        );
        // Flags (or the environment, which clap folds into them) win over the file.
        let t = resolve(Some("https://api.example".into()), None, None, root.path()).unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.api_key.as_str()),
            ("https://api.example", "from-file")
        );
        assert!(!format!("{t:?}").contains("from-file"));
    }

    #[test]
    fn nothing_configured_is_a_usage_error() {
        let empty = tempfile::tempdir().unwrap();
        let err = resolve(None, None, None, empty.path()).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(ref m) if m.contains("no endpoint")),
            "{err}"
        );
        let err = resolve(Some("h:1".into()), None, None, empty.path()).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(ref m) if m.contains("no API key")),
            "{err}"
        );
    }
}
