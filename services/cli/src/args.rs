//! The command line, as clap parses it. Validation that clap cannot express (durations,
//! `K=V` pairs, octal modes) happens in value parsers here, so a bad argument is a usage
//! error (exit 2) before anything is sent. Every option and positional has help text (a
//! test walks the whole tree).

use std::net::IpAddr;
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

const PROCESS_WAIT_HELP: &str = "\
Exit status:
  0..255   the process's exit status
  128+N    the process was ended by signal N (143: TERM, 137: KILL)
  124      the process still runs after --timeout
  1        also: an API or connection error (printed as `capsa: CODE: message`)
  2        usage error";

const SHELL_HELP: &str = "\
The local terminal is put in raw mode (every key, Ctrl-C included, goes to the session)
and restored when the command ends, however it ends. Resizing the local window resizes
the remote terminal. Exit status: the remote program's (128+N when signal N ended it).";

const PORT_FORWARD_HELP: &str = "\
Each accepted local connection opens its own tunnel to 127.0.0.1:REMOTE in the session's
VM (no guest network is involved). Prints `Forwarding from ADDRESS:PORT -> REMOTE` per
mapping once listening (LOCAL 0 picks a free port), then runs until interrupted. A
connection to a guest port nothing listens on is closed and reported on stderr; the
forwarder keeps serving.";

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
    /// Save a session's VM to its node's disk and stop it (no cpu or memory billed).
    Suspend(SessionArg),
    /// Bring a suspended session back with everything it had.
    Resume(SessionArg),
    /// List your sessions, newest first.
    List(ListArgs),
    /// Snapshots of running sessions (templates for new ones): create, list, info, rm.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Start new sessions from a running session's state now; print their ids.
    Fork(ForkArgs),
    /// Show a session's egress policy, or replace it with --set and the policy flags.
    Egress(EgressArgs),
    /// Background processes in a session: start, list, wait, kill, logs, write.
    #[command(subcommand)]
    Process(ProcessCommand),
    /// An interactive terminal in a session: bash, or the command after `--`.
    #[command(after_help = SHELL_HELP)]
    Shell(ShellArgs),
    /// Forward local TCP ports to TCP ports inside a session, like `kubectl port-forward`.
    #[command(after_help = PORT_FORWARD_HELP)]
    PortForward(PortForwardArgs),
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
    /// At its deadline, suspend the session instead of ending it.
    #[arg(long)]
    pub auto_suspend: bool,
    /// Let exec and the file commands resume a suspended session first.
    #[arg(long)]
    pub auto_resume: bool,
    /// Start from this snapshot (a template made with `capsa snapshot`).
    #[arg(long, value_name = "SNAPSHOT_ID")]
    pub from_snapshot: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running session's state (it runs on) and print the snapshot's id; start new
    /// sessions from it with `capsa create --from-snapshot ID`.
    Create(SnapshotCreateArgs),
    /// List your snapshots, newest first.
    List,
    /// Show a snapshot.
    Info(SnapshotArg),
    /// Delete a snapshot and its files (sessions made from it are not affected).
    Rm(SnapshotArg),
}

#[derive(Debug, Args)]
pub struct SnapshotCreateArgs {
    /// Session id.
    pub session: String,
    /// Its name, 1 to 128 characters (need not be unique).
    #[arg(long)]
    pub name: String,
    /// Label, K=V (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct SnapshotArg {
    /// Snapshot id (snap-...).
    pub snapshot: String,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Session id of the running session to fork.
    pub session: String,
    /// How many sessions, 1 to 8 (all are created or none is).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Each fork's lifetime [default: the parent's]
    #[arg(long, value_name = DURATION, value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
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
    Suspending,
    Suspended,
    Resuming,
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

#[derive(Debug, Subcommand)]
pub enum ProcessCommand {
    /// Start a process in the background and print its id.
    Start(ProcessStartArgs),
    /// List a session's processes and terminals.
    List(SessionArg),
    /// Wait for a process to exit; its exit status becomes this command's.
    #[command(after_help = PROCESS_WAIT_HELP)]
    Wait(ProcessWaitArgs),
    /// Send a signal to a process (its whole process group).
    Kill(ProcessKillArgs),
    /// Print a process's output: stdout to stdout, stderr to stderr.
    Logs(ProcessLogsArgs),
    /// Write this command's stdin to a process's stdin (started with --keep-stdin).
    Write(ProcessWriteArgs),
}

#[derive(Debug, Args)]
pub struct ProcessStartArgs {
    /// Session id.
    pub session: String,
    /// Extra environment for the process, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute) [default: the agent's]
    #[arg(long)]
    pub cwd: Option<String>,
    /// Size of the ring keeping its newest output for `capsa process logs` [default: the
    /// server's, 1 MiB; at most 16 MiB]
    #[arg(long, value_name = "BYTES")]
    pub buffer_bytes: Option<u64>,
    /// Keep its stdin open for `capsa process write` (otherwise it reads EOF at once).
    #[arg(long)]
    pub keep_stdin: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProcessArg {
    /// Session id.
    pub session: String,
    /// Process id, as `capsa process start` printed it (e.g. p-1).
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ProcessWaitArgs {
    #[command(flatten)]
    pub process: ProcessArg,
    /// How long to wait, at most 5m [default: the server's, 60s]
    #[arg(long, value_name = DURATION, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SignalName {
    #[value(name = "TERM", alias = "SIGTERM")]
    Term,
    #[value(name = "KILL", alias = "SIGKILL")]
    Kill,
    #[value(name = "INT", alias = "SIGINT")]
    Int,
    #[value(name = "HUP", alias = "SIGHUP")]
    Hup,
}

#[derive(Debug, Args)]
pub struct ProcessKillArgs {
    #[command(flatten)]
    pub process: ProcessArg,
    /// The signal.
    #[arg(
        long,
        short = 's',
        value_enum,
        ignore_case = true,
        default_value = "TERM"
    )]
    pub signal: SignalName,
}

#[derive(Debug, Args)]
pub struct ProcessLogsArgs {
    #[command(flatten)]
    pub process: ProcessArg,
    /// Start at this offset among all the bytes it wrote (stdout and stderr together);
    /// output its buffer no longer holds is reported on stderr.
    #[arg(long = "from", value_name = "OFFSET", default_value_t = 0)]
    pub from: u64,
    /// Keep printing new output until the process exits.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ProcessWriteArgs {
    #[command(flatten)]
    pub process: ProcessArg,
    /// Close the process's stdin (EOF) after writing.
    #[arg(long)]
    pub close: bool,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Session id.
    pub session: String,
    /// Extra environment for the terminal, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute) [default: the agent's]
    #[arg(long)]
    pub cwd: Option<String>,
    /// TERM in the session [default: xterm-256color]
    #[arg(long)]
    pub term: Option<String>,
    /// The program and its arguments, after `--` [default: bash as a login shell]
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// One forwarded port: where to listen locally and where to connect in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// 0: any free port.
    pub local: u16,
    pub remote: u16,
}

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// Session id.
    pub session: String,
    /// LOCAL:REMOTE, or PORT for the same port on both sides (repeatable).
    #[arg(required = true, value_name = "[LOCAL:]REMOTE", value_parser = parse_port_mapping)]
    pub ports: Vec<PortMapping>,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: IpAddr,
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

/// `LOCAL:REMOTE` or `PORT` (both sides); LOCAL may be 0, REMOTE is 1 to 65535.
pub fn parse_port_mapping(s: &str) -> Result<PortMapping, String> {
    let port = |p: &str, what: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{what} port {p:?} is not a number from 0 to 65535"))
    };
    let (local, remote) = match s.split_once(':') {
        Some((local, remote)) => (port(local, "local")?, port(remote, "remote")?),
        None => {
            let p = port(s, "the")?;
            (p, p)
        }
    };
    if remote == 0 {
        return Err(format!("{s:?}: the remote port must be 1 to 65535"));
    }
    Ok(PortMapping { local, remote })
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
        assert!(
            matches!(parse(&["suspend", "s-1"]).unwrap().command, Command::Suspend(a) if a.session == "s-1")
        );
        assert!(
            matches!(parse(&["resume", "s-1"]).unwrap().command, Command::Resume(a) if a.session == "s-1")
        );
        assert!(
            matches!(parse(&["create", "--auto-suspend", "--auto-resume"]).unwrap().command, Command::Create(c) if c.auto_suspend && c.auto_resume)
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
    fn process_start_takes_the_command_after_a_double_dash() {
        let Command::Process(ProcessCommand::Start(p)) = parse(&[
            "process",
            "start",
            "s-1",
            "--env",
            "A=1",
            "--cwd",
            "/srv",
            "--buffer-bytes",
            "4096",
            "--keep-stdin",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(p.session, "s-1");
        assert_eq!(p.env, [("A".into(), "1".into())]);
        assert_eq!(p.cwd.as_deref(), Some("/srv"));
        assert_eq!(p.buffer_bytes, Some(4096));
        assert!(p.keep_stdin);
        // Its own flags stay the command's.
        assert_eq!(
            p.command,
            ["python3", "-m", "http.server", "--bind", "127.0.0.1"]
        );
        for bad in [
            &["process", "start", "s-1"][..],
            &["process", "start", "s-1", "--"],
            &["process", "start", "s-1", "sleep", "1"],
            &["process", "start", "s-1", "--buffer-bytes", "1M", "--", "x"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn process_subcommands() {
        let process = |args: &[&str]| {
            let args: Vec<&str> = std::iter::once("process")
                .chain(args.iter().copied())
                .collect();
            parse(&args).map(|cli| match cli.command {
                Command::Process(p) => p,
                other => panic!("{other:?}"),
            })
        };
        assert!(matches!(
            process(&["list", "s-1"]).unwrap(),
            ProcessCommand::List(a) if a.session == "s-1"
        ));
        let ProcessCommand::Wait(w) = process(&["wait", "s-1", "p-3", "--timeout", "2m"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (w.process.session.as_str(), w.process.id.as_str()),
            ("s-1", "p-3")
        );
        assert_eq!(w.timeout, Some(Duration::from_secs(120)));
        let ProcessCommand::Wait(w) = process(&["wait", "s-1", "p-3"]).unwrap() else {
            panic!()
        };
        assert_eq!(w.timeout, None);

        for (given, want) in [
            (None, SignalName::Term),
            (Some("KILL"), SignalName::Kill),
            (Some("int"), SignalName::Int),
            (Some("SIGHUP"), SignalName::Hup),
            (Some("sigterm"), SignalName::Term),
        ] {
            let mut args = vec!["kill", "s-1", "p-1"];
            if let Some(g) = given {
                args.extend(["--signal", g]);
            }
            let ProcessCommand::Kill(k) = process(&args).unwrap() else {
                panic!()
            };
            assert_eq!(k.signal, want, "{given:?}");
        }
        let ProcessCommand::Kill(k) = process(&["kill", "s-1", "p-1", "-s", "INT"]).unwrap() else {
            panic!()
        };
        assert_eq!(k.signal, SignalName::Int);

        let ProcessCommand::Logs(l) = process(&["logs", "s-1", "p-1"]).unwrap() else {
            panic!()
        };
        assert_eq!((l.from, l.follow), (0, false));
        let ProcessCommand::Logs(l) =
            process(&["logs", "s-1", "p-1", "--from", "1048576", "--follow"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((l.from, l.follow), (1 << 20, true));
        let ProcessCommand::Write(w) = process(&["write", "s-1", "p-1", "--close"]).unwrap() else {
            panic!()
        };
        assert!(w.close);

        for bad in [
            &["kill", "s-1", "p-1", "--signal", "USR1"][..],
            &["kill", "s-1"],
            &["wait", "s-1", "p-1", "--timeout", "later"],
            &["logs", "s-1", "p-1", "--from", "-1"],
            &["write", "s-1"],
            &["stop", "s-1", "p-1"],
        ] {
            assert_eq!(process(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn shell_runs_bash_or_the_command_after_a_double_dash() {
        let Command::Shell(s) = parse(&["shell", "s-1"]).unwrap().command else {
            panic!()
        };
        assert!(s.command.is_empty() && s.term.is_none());
        let Command::Shell(s) = parse(&[
            "shell", "s-1", "--term", "xterm", "--env", "K=V", "--", "python3", "-q",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(s.command, ["python3", "-q"]);
        assert_eq!(s.term.as_deref(), Some("xterm"));
        assert_eq!(s.env, [("K".into(), "V".into())]);
        assert_eq!(parse(&["shell"]).unwrap_err().exit_code(), 2);
        assert_eq!(
            parse(&["shell", "s-1", "python3"]).unwrap_err().exit_code(),
            2
        );
    }

    #[test]
    fn port_forward_mappings() {
        let Command::PortForward(f) = parse(&["port-forward", "s-1", "8080:8000", "9000", "0:22"])
            .unwrap()
            .command
        else {
            panic!()
        };
        let m = |local, remote| PortMapping { local, remote };
        assert_eq!(f.ports, [m(8080, 8000), m(9000, 9000), m(0, 22)]);
        assert_eq!(f.address, IpAddr::from([127, 0, 0, 1]));
        let Command::PortForward(f) = parse(&["port-forward", "s-1", "80", "--address", "::1"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(f.address, "::1".parse::<IpAddr>().unwrap());

        for bad in ["8000:0", "0", "x", "70000", "1:2:3", ":80", "80:", "-1:80"] {
            assert!(parse_port_mapping(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_port_mapping("8000:0")
                .unwrap_err()
                .contains("remote port must be 1 to 65535")
        );
        for bad in [
            &["port-forward", "s-1"][..],
            &["port-forward", "s-1", "8000:0"],
            &["port-forward", "s-1", "80", "--address", "localhost"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
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
