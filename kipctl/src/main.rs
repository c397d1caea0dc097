//! `kipctl`: admin CLI for the kip control plane. All logic lives in the `kipctl` library.
//!
//! A closed stdout (`kipctl ... | head -n1`) ends the command quietly with success, as
//! standard tools do: the reader has what it wanted, and a pipeline under `set -o pipefail`
//! must not fail because of it.

use std::io::Write as _;

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kipctl::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let res = kipctl::run(cli, &mut stdout)
        .await
        .and_then(|()| stdout.flush().map_err(kipctl::CliError::from));
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(kipctl::CliError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kipctl: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
