//! The `cascade` binary.

use clap::Parser;

use cascade::cli::{Cli, Command};
use cascade::commands;

// glibc's allocator hands large freed buffers back to the kernel, so
// every prefill step paid page faults and page clearing again for its
// activations (about 8% of Phi-1.5's prefill samples under perf);
// mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any thread starts: it sets a process-wide variable.
    local_model::threads::settle_thread_count();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match &cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Keys(cmd) => commands::keys::run(cmd),
        Command::Serve(args) => commands::serve::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Calibrate(args) => commands::calibrate::run(args),
        Command::Report(args) => commands::report::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
