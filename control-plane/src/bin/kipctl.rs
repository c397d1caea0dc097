//! `kipctl`: admin CLI for the kip control plane. All logic lives in `kip_control_plane::cli`.

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kip_control_plane::cli::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match kip_control_plane::cli::run(cli, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kipctl: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
