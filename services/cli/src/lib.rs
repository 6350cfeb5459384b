//! `capsa`, the command-line client of the public SessionService, on `capsa-client`.
//!
//! - [`args`]: the command line (durations in humantime's grammar); endpoint and key come
//!   from flags, the environment or `.capsa/dev.env` ([`capsa_client::Config`]);
//! - [`commands`]: one function per subcommand; [`render`]: exec output as text or JSON
//!   lines; [`view`]: sessions, usage, files and processes; [`error`]: exit codes;
//! - [`process`]: `capsa process ...`; [`shell`]: `capsa shell` (raw mode, resizes);
//!   [`forward`]: `capsa port-forward`.

pub mod args;
pub mod commands;
pub mod error;
pub mod forward;
pub mod process;
pub mod render;
pub mod shell;
pub mod view;

use args::{Cli, Command};
use capsa_client::{Client, Config};
pub use error::CliError;

/// Runs one parsed command line; returns the process exit status.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    if let Command::Completions(a) = &cli.command {
        // Needs no server: printed from the command tree alone.
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(a.shell, &mut command, "capsa", &mut std::io::stdout());
        return Ok(0);
    }
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::Usage(format!("no current directory: {e}")))?;
    let config = Config::resolve(cli.endpoint, cli.api_key, cli.env_file.as_deref(), &cwd)?;
    let client = Client::with_config(&config).await?;
    let json = cli.json;
    match cli.command {
        Command::Create(a) => commands::create(&client, a, json).await,
        Command::Exec(a) => commands::exec(&client, a, json).await,
        Command::Upload(a) => commands::upload(&client, a, json).await,
        Command::Download(a) => commands::download(&client, a, json).await,
        Command::Ls(a) => commands::ls(&client, a, json).await,
        Command::Stat(a) => commands::stat(&client, a, json).await,
        Command::Mkdir(a) => commands::mkdir(&client, a, json).await,
        Command::Rm(a) => commands::rm(&client, a, json).await,
        Command::Info(a) => commands::info(&client, a, json).await,
        Command::Usage(a) => commands::usage(&client, a, json).await,
        Command::Extend(a) => commands::extend(&client, a, json).await,
        Command::Kill(a) => commands::kill(&client, a, json).await,
        Command::Suspend(a) => commands::suspend(&client, a, json).await,
        Command::Resume(a) => commands::resume(&client, a, json).await,
        Command::List(a) => commands::list(&client, a, json).await,
        Command::Snapshot(c) => commands::snapshot(&client, c, json).await,
        Command::Fork(a) => commands::fork(&client, a, json).await,
        Command::Egress(a) => commands::egress(&client, a, json).await,
        Command::Process(p) => process::run(&client, p, json).await,
        Command::Shell(a) => shell::shell(&client, a).await,
        Command::PortForward(a) => forward::port_forward(&client, a, json).await,
        Command::Completions(_) => unreachable!("handled above"),
    }
}
