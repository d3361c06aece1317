//! The `keyward` binary: `keyward serve` runs the control plane; the other subcommands are
//! HTTP clients of its admin API.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match keyward_control_plane::cli::run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
