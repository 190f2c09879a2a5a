//! The `tokenbroker` binary: parse flags, load and validate config before any
//! port is bound, start telemetry, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser as _;
use tokenbroker::cli::{Cli, Command};
use tokenbroker::{app, cli, telemetry};

// See Cargo.toml: measured in BENCHMARKS.md (restart, memory, hot path).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match app::serve_config(&args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(2);
                }
            };
            if args.print_config {
                print!("{}", config.redacted_toml());
                return ExitCode::SUCCESS;
            }
            let _telemetry =
                match telemetry::init_with_otlp(config.log_format, config.otlp_endpoint.as_deref())
                {
                    Ok(guard) => guard,
                    Err(error) => {
                        eprintln!("error: {error}");
                        return ExitCode::from(2);
                    }
                };
            match app::serve(config, &args, telemetry::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "tokenbroker failed");
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DevIdp(args) => {
            telemetry::init(tokenbroker::config::LogFormat::Text);
            match app::dev_idp(&args, telemetry::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Rekey(args) => {
            telemetry::init(tokenbroker::config::LogFormat::Text);
            match app::rekey(&args.data_dir, args.key_file.as_deref(), args.rotate).await {
                Ok((keys, resealed)) => {
                    println!(
                        "{resealed} sessions re-sealed under key {}; send SIGHUP to a running broker so it seals with it too",
                        keys.primary()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        command => match cli::run_client(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
