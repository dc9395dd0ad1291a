//! The mock OpenAI upstream as a process, for benchmarks and the Python
//! client test: `cascade-mock-upstream --port 0 --delay-ms 20`.
//!
//! Prints `listening on http://ADDR/v1` once bound, then serves until killed.

use std::net::SocketAddr;
use std::time::Duration;

use cascade_e2e::{MockOptions, MockUpstream};

fn usage() -> ! {
    eprintln!("usage: cascade-mock-upstream [--host 127.0.0.1] [--port 0] [--delay-ms 0] [--chunk-delay-ms 0] [--bill-max-output false]");
    std::process::exit(2)
}

fn main() -> std::io::Result<()> {
    let mut host = "127.0.0.1".to_string();
    let mut port = 0u16;
    let mut options = MockOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--host" => host = value,
            "--port" => port = value.parse().unwrap_or_else(|_| usage()),
            "--delay-ms" => {
                options.delay = Duration::from_millis(value.parse().unwrap_or_else(|_| usage()))
            }
            "--chunk-delay-ms" => {
                options.chunk_delay =
                    Duration::from_millis(value.parse().unwrap_or_else(|_| usage()))
            }
            "--bill-max-output" => {
                options.bill_max_output = value.parse().unwrap_or_else(|_| usage())
            }
            _ => usage(),
        }
    }
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Benchmarks send many requests: keep no copies of them.
        let mock = MockUpstream::start_on(addr, options, false).await?;
        println!("listening on {}", mock.base_url());
        let _ = tokio::signal::ctrl_c().await;
        Ok(())
    })
}
