//! `kipctl`: admin CLI for the kip control plane. All logic lives in the `kipctl` library.

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kipctl::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match kipctl::run(cli, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kipctl: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
