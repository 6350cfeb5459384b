//! The command line, as clap parses it. Validation that clap cannot express (durations,
//! `K=V` pairs, octal modes) happens in value parsers here, so a bad argument is a usage
//! error (exit 2) before anything is sent. Every option and positional has help text (a
//! test walks the whole tree).

use std::path::PathBuf;
use std::time::Duration;

use capsa_client::EgressPolicy;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Exit status of `capsa exec` when the code did not simply run to its end.
pub const EXIT_TIMEOUT: u8 = 124;
pub const EXIT_INTERRUPTED: u8 = 130;
pub const EXIT_KERNEL_DIED: u8 = 137;

const EXEC_HELP: &str = "\
Exit status:
  0        the code ran to its end (shell: exit status 0)
  1..255   shell: the code's exit status; python: 1 after an uncaught exception
  124      the execute timed out (--timeout); the kernel's state is kept unless noted
  130      the execute was interrupted
  137      the kernel died; its state (variables, imports) is lost
  1        also: an API or connection error (printed as `capsa: CODE: message`)
  2        usage error

Output: stdout and stderr stream live as raw bytes; a trailing expression's value is
printed like a REPL; display data (e.g. matplotlib PNGs) is saved to files.
With --json, every event is one JSON line on stdout (output as \"text\" when it is
UTF-8, else \"base64\").";

const COMPLETIONS_HELP: &str = "\
Install, e.g.:
  bash: capsa completions bash > ~/.local/share/bash-completion/completions/capsa
  zsh:  capsa completions zsh > ~/.zfunc/_capsa   (with ~/.zfunc in $fpath)
  fish: capsa completions fish > ~/.config/fish/completions/capsa.fish";

/// Durations are humantime's: `500ms`, `30s`, `10m`, `1h`, `1h30m`, `2h 5m`.
const DURATION: &str = "DURATION";

#[derive(Debug, Parser)]
#[command(
    name = "capsa",
    version,
    about = "Run code in persistent Capsa sandboxes."
)]
pub struct Cli {
    /// API endpoint, e.g. http://127.0.0.1:50051 [default: from the env file]
    #[arg(long, env = "CAPSA_ENDPOINT", global = true, hide_env_values = true)]
    pub endpoint: Option<String>,

    /// API key [default: from the env file]
    #[arg(long, env = "CAPSA_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,

    /// File of CAPSA_ENDPOINT= / CAPSA_API_KEY= lines to read what the flags and environment
    /// do not set [default: .capsa/dev.env in the current directory only, never a parent's]
    #[arg(long, env = "CAPSA_ENV_FILE", global = true, value_name = "PATH")]
    pub env_file: Option<PathBuf>,

    /// Machine-readable output: one JSON object per line (and no progress bars).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a session and print its id.
    Create(CreateArgs),
    /// Run code in a session's persistent kernel.
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// Upload a local file into a session (a progress bar on a terminal).
    Upload(UploadArgs),
    /// Download a file from a session (streams to disk; LOCAL `-` is stdout).
    Download(DownloadArgs),
    /// List a directory in a session.
    Ls(LsArgs),
    /// Show a file or directory in a session.
    Stat(PathArgs),
    /// Create a directory (and its parents) in a session.
    Mkdir(MkdirArgs),
    /// Remove a file, or with -r a directory and everything under it, in a session.
    Rm(RmArgs),
    /// Show a session.
    Info(SessionArg),
    /// Resource use of a session, or of your whole tenant with --tenant.
    Usage(UsageArgs),
    /// Push a session's deadline out by DURATION.
    Extend(ExtendArgs),
    /// End a session and destroy its VM.
    Kill(SessionArg),
    /// List your sessions, newest first.
    List(ListArgs),
    /// Show a session's egress policy, or replace it with --set and the policy flags.
    Egress(EgressArgs),
    /// Print a shell completion script to stdout.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions(CompletionsArgs),
}

/// What a session's VM may reach, as flags. At create, no flag means the server's default
/// (your tenant's, else the deployment's); any flag makes the whole policy.
#[derive(Debug, Default, Args)]
pub struct EgressFlags {
    /// Allow this name (`example.com`) or every name below a domain (`*.example.com`);
    /// repeatable.
    #[arg(long = "allow-domain", value_name = "DOMAIN")]
    pub allow_domains: Vec<String>,
    /// Allow this network (`198.51.100.0/24`) or address, every port; repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidrs: Vec<String>,
    /// Allow the Python, npm, Debian and crates package registries.
    #[arg(long)]
    pub allow_package_managers: bool,
    /// Block TCP port 80 to every allowed destination.
    #[arg(long)]
    pub no_http: bool,
    /// Block TCP port 443 to every allowed destination.
    #[arg(long)]
    pub no_https: bool,
    /// No network access at all.
    #[arg(long, conflicts_with_all = [
        "allow_domains", "allow_cidrs", "allow_package_managers", "no_http", "no_https"
    ])]
    pub no_egress: bool,
}

impl EgressFlags {
    /// The policy the flags make, or `None` when no flag was given. Entries go to the
    /// server as typed: it validates them and names a bad one.
    pub fn policy(&self) -> Option<EgressPolicy> {
        let given = self.no_egress
            || self.allow_package_managers
            || self.no_http
            || self.no_https
            || !self.allow_domains.is_empty()
            || !self.allow_cidrs.is_empty();
        given.then(|| EgressPolicy {
            deny_all: self.no_egress,
            allow_package_managers: self.allow_package_managers,
            allow_http: self.no_http.then_some(false),
            allow_https: self.no_https.then_some(false),
            allowed_domains: self.allow_domains.clone(),
            allowed_cidrs: self.allow_cidrs.clone(),
        })
    }
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("policy_flags")
        .args(["allow_domains", "allow_cidrs", "allow_package_managers", "no_http", "no_https", "no_egress"])
        .multiple(true)
        .requires("set")
))]
pub struct EgressArgs {
    /// Session id.
    pub session: String,
    /// Replace the policy with the one the flags make (needs at least one flag).
    #[arg(long, requires = "policy_flags")]
    pub set: bool,
    #[command(flatten)]
    pub policy: EgressFlags,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM template [default: the server's default]
    #[arg(long)]
    pub template: Option<String>,
    /// Virtual CPUs, 1 to 8 [default: the template's, 1]
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB, 128 to 8192 [default: the template's, 512]
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Lifetime, e.g. 10m or 1h30m [default: the server's, 5m]
    #[arg(long, value_name = DURATION, value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
    /// Environment for every kernel, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Label to filter `capsa list` by, K=V (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub egress: EgressFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Python,
    Shell,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Session id.
    pub session: String,
    /// Code to run; `-` reads it from stdin.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub code: Option<String>,
    /// Read the code from FILE.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Interpreter: each has one persistent kernel per session.
    #[arg(long, value_enum, default_value_t = Lang::Python)]
    pub lang: Lang,
    /// Timeout measured in the sandbox, e.g. 30s [default: the server's, 60s]
    #[arg(long, value_name = DURATION, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Extra environment for this call only, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory for this call only.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Output cap in bytes: stdout, stderr, results and display data together [default: the
    /// server's, 32 MiB]
    #[arg(long)]
    pub max_output_bytes: Option<u64>,
    /// Directory to save display data (images) in [default: the system temp dir]
    #[arg(long)]
    pub display_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Session id.
    pub session: String,
    /// Local file to read.
    pub local: PathBuf,
    /// Absolute path in the session; parent directories are created.
    pub remote: String,
    /// Permission bits in octal, e.g. 755 [default: 644]
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Fail instead of replacing an existing file.
    #[arg(long)]
    pub no_overwrite: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Session id.
    pub session: String,
    /// Absolute path of the file in the session.
    pub remote: String,
    /// Local file to write (replaced only once complete), a directory to write into, or
    /// `-` for stdout.
    pub local: PathBuf,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Session id.
    pub session: String,
    /// Directory to list (absolute).
    #[arg(default_value = "/")]
    pub path: String,
}

#[derive(Debug, Args)]
pub struct PathArgs {
    /// Session id.
    pub session: String,
    /// Absolute path in the session.
    pub path: String,
}

#[derive(Debug, Args)]
pub struct MkdirArgs {
    /// Session id.
    pub session: String,
    /// Absolute path of the directory; missing parents are created too.
    pub path: String,
    /// Permission bits in octal, e.g. 700 [default: 755]
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Session id.
    pub session: String,
    /// Absolute path of the file or directory.
    pub path: String,
    /// Remove a directory and everything under it.
    #[arg(short = 'r', long)]
    pub recursive: bool,
}

#[derive(Debug, Args)]
pub struct SessionArg {
    /// Session id.
    pub session: String,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Session id (or --tenant).
    #[arg(required_unless_present = "tenant", conflicts_with = "tenant")]
    pub session: Option<String>,
    /// Sum over every session of your tenant.
    #[arg(long)]
    pub tenant: bool,
}

#[derive(Debug, Args)]
pub struct ExtendArgs {
    /// Session id.
    pub session: String,
    /// How much longer, e.g. 10m or 1h.
    #[arg(value_name = DURATION, value_parser = parse_duration)]
    pub by: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    Creating,
    Active,
    Terminating,
    Terminated,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only sessions in this status.
    #[arg(long, value_enum)]
    pub status: Option<StatusFilter>,
    /// Only sessions with this label, K=V (repeatable; all must match).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// humantime's grammar: `500ms`, `30s`, `10m`, `1h`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; durations look like 30s, 10m or 1h30m"))
}

/// `K=V` with a non-empty key.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Octal permission bits, e.g. `755` or `0o600`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "expected octal permission bits like 755, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("capsa").chain(args.iter().copied()))
    }

    #[test]
    fn exec_takes_code_or_a_file_and_its_options() {
        let cli = parse(&[
            "exec",
            "s-1",
            "print(1)",
            "--lang",
            "shell",
            "--timeout",
            "30s",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--cwd",
            "/tmp",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Exec(e) = cli.command else {
            panic!()
        };
        assert_eq!(e.code.as_deref(), Some("print(1)"));
        assert_eq!(e.lang, Lang::Shell);
        assert_eq!(e.timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            e.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(e.cwd.as_deref(), Some("/tmp"));

        let Command::Exec(e) = parse(&["exec", "s-1", "-f", "job.py"]).unwrap().command else {
            panic!()
        };
        assert_eq!(e.file, Some(PathBuf::from("job.py")));
        assert_eq!(e.lang, Lang::Python);
    }

    #[test]
    fn exec_usage_errors() {
        for bad in [
            &["exec", "s-1"][..],
            &["exec", "s-1", "x", "-f", "y"],
            &["exec", "s-1", "x", "--timeout", "soon"],
            &["exec", "s-1", "x", "--env", "novalue"],
            &["exec", "s-1", "x", "--lang", "ruby"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn create_list_usage_and_upload_options() {
        let Command::Create(c) = parse(&[
            "create",
            "--lifetime",
            "10m",
            "--vcpus",
            "2",
            "--env",
            "K=V",
            "--label",
            "team=ml",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(c.lifetime, Some(Duration::from_secs(600)));
        assert_eq!((c.vcpus, c.memory_mib), (Some(2), None));
        assert_eq!(c.labels, [("team".into(), "ml".into())]);

        let Command::List(l) = parse(&["list", "--status", "active", "--label", "a=b"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(l.status, Some(StatusFilter::Active));

        assert!(parse(&["usage"]).is_err());
        assert!(parse(&["usage", "--tenant"]).is_ok());
        assert!(parse(&["usage", "s-1"]).is_ok());

        let Command::Upload(u) = parse(&["upload", "s-1", "a", "/b", "--mode", "755"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(u.mode, Some(0o755));
        assert!(parse(&["upload", "s-1", "a", "/b", "--mode", "9"]).is_err());
        assert!(
            matches!(parse(&["extend", "s-1", "1h"]).unwrap().command, Command::Extend(e) if e.by == Duration::from_secs(3600))
        );
    }

    #[test]
    fn create_takes_egress_flags_and_none_means_the_server_default() {
        let create = |extra: &[&str]| {
            let args: Vec<&str> = std::iter::once("create")
                .chain(extra.iter().copied())
                .collect();
            parse(&args).map(|cli| match cli.command {
                Command::Create(c) => c.egress.policy(),
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(create(&[]).unwrap(), None);
        let p = create(&[
            "--allow-domain",
            "pypi.org",
            "--allow-domain",
            "*.example.com",
            "--allow-cidr",
            "198.51.100.0/24",
            "--allow-package-managers",
            "--no-http",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(p.allowed_domains, ["pypi.org", "*.example.com"]);
        assert_eq!(p.allowed_cidrs, ["198.51.100.0/24"]);
        assert!(p.allow_package_managers && !p.deny_all);
        assert_eq!((p.allow_http, p.allow_https), (Some(false), None));
        let p = create(&["--no-https"]).unwrap().unwrap();
        assert_eq!((p.allow_http, p.allow_https), (None, Some(false)));
        let p = create(&["--no-egress"]).unwrap().unwrap();
        assert!(p.deny_all && p.allowed_domains.is_empty());
        let err = create(&["--no-egress", "--allow-domain", "pypi.org"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn egress_shows_or_sets_with_flags() {
        let egress = |args: &[&str]| {
            let args: Vec<&str> = std::iter::once("egress")
                .chain(args.iter().copied())
                .collect();
            parse(&args).map(|cli| match cli.command {
                Command::Egress(e) => e,
                other => panic!("{other:?}"),
            })
        };
        let e = egress(&["s-1"]).unwrap();
        assert!(!e.set && e.policy.policy().is_none());
        assert_eq!(e.session, "s-1");
        let e = egress(&["s-1", "--set", "--allow-cidr", "203.0.113.7"]).unwrap();
        assert!(e.set);
        assert_eq!(e.policy.policy().unwrap().allowed_cidrs, ["203.0.113.7"]);
        let e = egress(&["s-1", "--set", "--no-egress"]).unwrap();
        assert!(e.policy.policy().unwrap().deny_all);
        for bad in [
            &["s-1", "--set"][..],
            &["s-1", "--allow-domain", "pypi.org"],
            &["s-1", "--no-egress"],
            &["--set", "--no-egress"],
            &["s-1", "--set", "--no-egress", "--no-http"],
        ] {
            assert_eq!(egress(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn modes_and_pairs() {
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("12345").is_err());
        assert!(parse_pair("=v").is_err());
        assert_eq!(parse_pair("k="), Ok(("k".into(), String::new())));
    }

    #[test]
    fn durations_are_humantime() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "soon", "5x", "-3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_subcommands() {
        let Command::Rm(r) = parse(&["rm", "s-1", "/d", "-r"]).unwrap().command else {
            panic!()
        };
        assert!(r.recursive && r.path == "/d");
        let Command::Rm(r) = parse(&["rm", "s-1", "/f"]).unwrap().command else {
            panic!()
        };
        assert!(!r.recursive);
        let Command::Mkdir(m) = parse(&["mkdir", "s-1", "/a/b", "--mode", "700"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((m.path.as_str(), m.mode), ("/a/b", Some(0o700)));
        assert!(matches!(
            parse(&["stat", "s-1", "/f"]).unwrap().command,
            Command::Stat(p) if p.path == "/f"
        ));
        assert_eq!(parse(&["stat", "s-1"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn every_option_and_positional_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "capsa",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn a_mistyped_subcommand_gets_a_suggestion() {
        let err = parse(&["exce", "s-1", "x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("'exec'"), "{err}");
        let err = parse(&["create", "--lifetim", "1m"]).unwrap_err();
        assert!(err.to_string().contains("--lifetime"), "{err}");
    }
}
