//! Link emulation in userspace: a TCP relay that delays every byte by a fixed one-way time in
//! each direction (this kernel has no netem).
//!
//! Each chunk read from one side is written to the other side `delay` after it was read, in
//! order. Bandwidth is not limited; memory is: at most [`QUEUE_CHUNKS`] chunks of at most
//! [`CHUNK`] bytes wait per direction, after which reading pauses (at a 10 ms one-way delay
//! that caps a direction at about 1.6 GB/s). The timer has millisecond granularity, so a chunk
//! can arrive up to about 1 ms late.
//!
//! [`forward_delayed`] is the core and works on any byte stream (a `Connector` wrapper can use
//! it to add latency to an agent stream); [`DelayRelay`] runs it for TCP connections on a
//! thread of its own.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Largest chunk read at once.
pub const CHUNK: usize = 64 << 10;
/// Chunks waiting per direction before reading pauses.
pub const QUEUE_CHUNKS: usize = 256;

/// Copies `reader` to `writer`, delaying each chunk by `delay`, counting the bytes written in
/// `written`. Shuts `writer` down after the reader's end has been delivered.
pub async fn forward_delayed<R, W>(
    mut reader: R,
    mut writer: W,
    delay: Duration,
    written: Arc<AtomicU64>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if delay.is_zero() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).await?;
            written.fetch_add(n as u64, Ordering::Relaxed);
        }
        return writer.shutdown().await;
    }
    // reader side --(due time, chunk)--> writer side
    let (chunks_tx, mut chunks_rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reading = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let due = Instant::now() + delay;
            if chunks_tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writing = async move {
        while let Some((due, chunk)) = chunks_rx.recv().await {
            tokio::time::sleep_until(due).await;
            writer.write_all(&chunk).await?;
            written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        writer.shutdown().await
    };
    tokio::try_join!(reading, writing).map(|_| ())
}

/// Byte counts of a relay, over all its connections, live.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Client → upstream.
    pub up: Arc<AtomicU64>,
    /// Upstream → client.
    pub down: Arc<AtomicU64>,
    pub connections: AtomicU64,
}

/// A delaying TCP relay on 127.0.0.1, forwarding to `upstream`, running on its own thread
/// until dropped.
pub struct DelayRelay {
    port: u16,
    stats: Arc<RelayStats>,
    /// drop --stop--> relay thread
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on a free port of 127.0.0.1; every connection is relayed to `upstream` with
    /// `rtt / 2` of delay each way.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> io::Result<DelayRelay> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), upstream, rtt)
    }

    /// Like [`DelayRelay::start`], listening on `listen`.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr, rtt: Duration) -> io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let stats = Arc::new(RelayStats::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("delay-relay-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("kmount-delay: cannot listen: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, upstream, rtt / 2, thread_stats) => {}
                    }
                });
                // Dropping the runtime ends every connection task.
            })?;
        Ok(DelayRelay {
            port,
            stats,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Bytes relayed client → upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.stats.up.load(Ordering::Relaxed)
    }

    /// Bytes relayed upstream → client so far.
    pub fn bytes_down(&self) -> u64 {
        self.stats.down.load(Ordering::Relaxed)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_tx.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections forever, relaying each in a task of its own.
pub async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    one_way: Duration,
    stats: Arc<RelayStats>,
) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kmount-delay: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (up, down) = (stats.up.clone(), stats.down.clone());
        tokio::spawn(async move {
            if let Err(e) = relay_one(client, upstream, one_way, up, down).await
                && e.kind() == io::ErrorKind::ConnectionRefused
            {
                eprintln!("kmount-delay: cannot connect to {upstream}: {e}");
            }
        });
    }
}

async fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    one_way: Duration,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let to_server = forward_delayed(client_r, server_w, one_way, up);
    let to_client = forward_delayed(server_r, client_w, one_way, down);
    let (a, b) = tokio::join!(to_server, to_client);
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant as StdInstant;

    /// An echo server on a free port; returns its address.
    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(port: u16, payload: &[u8]) -> Duration {
        let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        s.set_nodelay(true).unwrap();
        let start = StdInstant::now();
        s.write_all(payload).unwrap();
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, payload);
        start.elapsed()
    }

    #[test]
    fn adds_the_round_trip_time_and_keeps_order() {
        let echo = echo_server();
        let relay = DelayRelay::start(echo, Duration::from_millis(40)).unwrap();
        let rtt = round_trip(relay.port(), b"ping");
        assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
        // Upper bounds are loose: the machine may be busy.
        assert!(rtt < Duration::from_millis(1000), "{rtt:?}");
        // A few MiB in many chunks arrive complete and in order (round_trip compares them).
        // How long that takes is the benchmark's business, not a test's: this machine is shared.
        let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        round_trip(relay.port(), &big);
        assert!(relay.bytes_up() >= 4 << 20 && relay.bytes_down() >= 4 << 20);

        let direct = DelayRelay::start(echo, Duration::ZERO).unwrap();
        let rtt = round_trip(direct.port(), b"ping");
        assert!(rtt < Duration::from_millis(500), "{rtt:?}");
    }

    #[test]
    fn end_of_stream_is_passed_on() {
        let echo = echo_server();
        let relay = DelayRelay::start(echo, Duration::from_millis(10)).unwrap();
        let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, relay.port())).unwrap();
        s.write_all(b"bye").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"bye");
    }
}
