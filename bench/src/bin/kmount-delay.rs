//! `kmount-delay --listen 127.0.0.1:PORT --connect 127.0.0.1:22 --rtt-ms 20`: a TCP relay that
//! adds `rtt/2` of delay in each direction (see `kmount_bench::delay`). Runs until killed.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "kmount-delay",
    about = "Relay TCP connections with a fixed added round-trip time",
    after_help = "Example:\n  kmount-delay --listen 127.0.0.1:2222 --connect 127.0.0.1:22 --rtt-ms 20\n  ssh -p 2222 localhost"
)]
struct Args {
    /// Address to listen on (port 0: any free port, printed on start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to relay every connection to.
    #[arg(long)]
    connect: SocketAddr,
    /// Round-trip time to add, in milliseconds (half each way).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if !(args.rtt_ms >= 0.0 && args.rtt_ms < 3_600_000.0) {
        eprintln!("kmount-delay: --rtt-ms must be between 0 and 3600000");
        return std::process::ExitCode::FAILURE;
    }
    let rtt = Duration::from_secs_f64(args.rtt_ms / 1000.0);
    match kmount_bench::delay::DelayRelay::start_on(args.listen, args.connect, rtt) {
        Ok(relay) => {
            println!(
                "kmount-delay: 127.0.0.1:{} -> {} with {} ms round trip",
                relay.port(),
                args.connect,
                args.rtt_ms
            );
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("kmount-delay: cannot listen on {}: {e}", args.listen);
            std::process::ExitCode::FAILURE
        }
    }
}
