//! Where the API is and which key to use. Precedence: what the caller passes (for the CLI:
//! `--endpoint` / `--api-key`, which clap also fills from the environment), then the
//! `CAPSA_ENDPOINT` / `CAPSA_API_KEY` environment ([`Config::from_env`]), then an env file:
//! one named explicitly, else `.capsa/dev.env` in the current directory (written by the dev
//! setup). Never a parent directory's: whoever can write a parent (a shared /tmp, a cloned
//! repo) could otherwise point the client, and the key it sends, at a server of theirs.
//!
//! `dev.env` is `KEY=VALUE` lines; blank lines and `#` comments are skipped, an `export `
//! prefix and surrounding quotes are accepted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A resolved endpoint and key. The key is redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// With a scheme: `http://host:port` (one is added when the source had none).
    pub endpoint: String,
    pub api_key: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Config {
    /// `CAPSA_ENDPOINT` / `CAPSA_API_KEY` from the environment, then `.capsa/dev.env` in
    /// the current directory for whatever they leave unset.
    pub fn from_env() -> Result<Config> {
        let cwd = std::env::current_dir()
            .map_err(|e| Error::Config(format!("no current directory: {e}")))?;
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Config::resolve(var("CAPSA_ENDPOINT"), var("CAPSA_API_KEY"), None, &cwd)
    }

    /// Fills what `endpoint` / `api_key` leave unset from an env file: `env_file`, which
    /// must exist, else `cwd/.capsa/dev.env` if there is one.
    pub fn resolve(
        endpoint: Option<String>,
        api_key: Option<String>,
        env_file: Option<&Path>,
        cwd: &Path,
    ) -> Result<Config> {
        let file = if endpoint.is_none() || api_key.is_none() {
            env_file
                .map(Path::to_path_buf)
                .or_else(|| find_dev_env(cwd))
                .map(|path| {
                    std::fs::read_to_string(&path)
                        .map(|text| parse_dev_env(&text))
                        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
                })
                .transpose()?
                .unwrap_or_default()
        } else {
            HashMap::new()
        };
        let missing = |what: &str, flag: &str, var: &str| {
            Error::Config(format!(
                "no {what}: pass {flag}, set {var}, pass --env-file, or run from the directory holding .capsa/dev.env"
            ))
        };
        let endpoint = endpoint
            .or_else(|| file.get("CAPSA_ENDPOINT").cloned())
            .ok_or_else(|| missing("endpoint", "--endpoint", "CAPSA_ENDPOINT"))?;
        let api_key = api_key
            .or_else(|| file.get("CAPSA_API_KEY").cloned())
            .ok_or_else(|| missing("API key", "--api-key", "CAPSA_API_KEY"))?;
        Ok(Config {
            endpoint: with_scheme(endpoint),
            api_key,
        })
    }
}

/// `host:port` becomes `http://host:port`; an endpoint with a scheme is kept.
pub fn with_scheme(endpoint: String) -> String {
    if endpoint.contains("://") {
        endpoint
    } else {
        format!("http://{endpoint}")
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

        let c = Config::resolve(None, None, None, root.path()).unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.api_key.as_str()),
            ("http://10.0.0.1:1", "from-file")
        );
        // Below it, the parent's file is not trusted: nothing is configured.
        let err = Config::resolve(None, None, None, &deep).unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("no endpoint")),
            "{err}"
        );
        // Unless named explicitly.
        let named = root.path().join(".capsa/dev.env");
        let c = Config::resolve(None, None, Some(&named), &deep).unwrap();
        assert_eq!(c.api_key, "from-file");
        // A named file that does not exist is an error, not a silent fallback.
        let err =
            Config::resolve(None, None, Some(&deep.join("nope.env")), root.path()).unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("nope.env")),
            "{err}"
        );
        // What the caller passes wins over the file.
        let c =
            Config::resolve(Some("https://api.example".into()), None, None, root.path()).unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.api_key.as_str()),
            ("https://api.example", "from-file")
        );
        assert!(!format!("{c:?}").contains("from-file"));
    }

    #[test]
    fn nothing_configured_is_a_config_error() {
        let empty = tempfile::tempdir().unwrap();
        let err = Config::resolve(None, None, None, empty.path()).unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("no endpoint")),
            "{err}"
        );
        let err = Config::resolve(Some("h:1".into()), None, None, empty.path()).unwrap_err();
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("no API key")),
            "{err}"
        );
    }
}
