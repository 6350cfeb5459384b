//! `capsa`, the command-line client of the public SessionService.
//!
//! - [`args`]: the command line; [`config`]: endpoint and key (flags, env, `.capsa/dev.env`);
//! - [`commands`]: one function per subcommand; [`render`]: exec output as text or JSON
//!   lines; [`view`]: sessions, usage and files;
//! - [`duration`]: `30s` / `10m` / `1h` / `500ms`; [`error`]: exit codes.

pub mod args;
pub mod commands;
pub mod config;
pub mod duration;
pub mod error;
pub mod render;
pub mod view;

use args::{Cli, Command};
pub use error::CliError;

/// Runs one parsed command line; returns the process exit status.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::Usage(format!("no current directory: {e}")))?;
    let target = config::resolve(cli.endpoint, cli.api_key, cli.env_file.as_deref(), &cwd)?;
    let mut client = commands::connect(&target).await?;
    let json = cli.json;
    match cli.command {
        Command::Create(a) => commands::create(&mut client, a, json).await,
        Command::Exec(a) => commands::exec(&mut client, a, json).await,
        Command::Upload(a) => commands::upload(&mut client, a, json).await,
        Command::Download(a) => commands::download(&mut client, a, json).await,
        Command::Ls(a) => commands::ls(&mut client, a, json).await,
        Command::Info(a) => commands::info(&mut client, a, json).await,
        Command::Usage(a) => commands::usage(&mut client, a, json).await,
        Command::Extend(a) => commands::extend(&mut client, a, json).await,
        Command::Kill(a) => commands::kill(&mut client, a, json).await,
        Command::List(a) => commands::list(&mut client, a, json).await,
        Command::Egress(a) => commands::egress(&mut client, a, json).await,
    }
}
