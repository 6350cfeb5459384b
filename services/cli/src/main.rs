//! `capsa`: parses the command line and runs it; errors print as `capsa: <message>` with
//! exit status 2 for usage errors and 1 for API errors (see `capsa exec --help` for the
//! statuses of the code itself).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap prints usage errors itself and exits with status 2.
    let cli = capsa_cli::args::Cli::parse();
    match capsa_cli::run(cli).await {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "capsa: {e}");
            e.exit_code()
        }
    }
}
