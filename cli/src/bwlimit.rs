//! `--bwlimit`: a token bucket on the byte stream to the agent, each direction on its own.
//!
//! [`LimitedConnector`] wraps any [`Connector`]: every stream it makes reads and writes at
//! most `rate` bytes per second on average, in bursts of at most [`burst`] bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use kmount_mount::{BoxedStream, ConnectFuture, Connector};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The largest burst for `rate`: a tenth of a second's worth, between 1 KiB and 1 MiB.
pub fn burst(rate: u64) -> u64 {
    (rate / 10).clamp(1024, 1 << 20)
}

/// Tokens are bytes; they refill at `rate` per second up to `capacity`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let capacity = burst(rate) as f64;
        Bucket {
            rate: rate as f64,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// How many of `want` bytes may pass now (at least 1), or how long until a useful amount
    /// (`want`, at most a full bucket) may.
    fn grant(&mut self, want: usize) -> Result<usize, Duration> {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            return Ok((self.tokens as usize).min(want).max(1));
        }
        let need = (want as f64).min(self.capacity) - self.tokens;
        Err(Duration::from_secs_f64(need / self.rate))
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// One direction of a limited stream.
pub struct Limited<T> {
    inner: T,
    bucket: Bucket,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<T> Limited<T> {
    pub fn new(inner: T, rate: u64) -> Self {
        Limited {
            inner,
            bucket: Bucket::new(rate),
            sleep: None,
        }
    }

    /// Waits until some bytes may pass; returns how many.
    fn poll_grant(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        loop {
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.bucket.grant(want) {
                Ok(n) => return Poll::Ready(n),
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let allowed = ready!(this.poll_grant(cx, buf.remaining()));
        let mut part = buf.take(allowed);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        // SAFETY: `part` is the start of `buf`'s unfilled part, and the inner reader
        // initialized and filled its first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        this.bucket.take(n);
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Limited<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        let allowed = ready!(this.poll_grant(cx, data.len()));
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &data[..allowed]))?;
        this.bucket.take(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A [`Connector`] whose streams carry at most `rate` bytes per second each way.
pub struct LimitedConnector {
    inner: Arc<dyn Connector>,
    rate: u64,
}

impl LimitedConnector {
    pub fn new(inner: Arc<dyn Connector>, rate: u64) -> Self {
        LimitedConnector { inner, rate }
    }
}

impl Connector for LimitedConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let mut stream: BoxedStream = self.inner.connect().await?;
            stream.reader = Box::new(Limited::new(stream.reader, self.rate));
            stream.writer = Box::new(Limited::new(stream.writer, self.rate));
            Ok(stream)
        })
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const RATE: u64 = 256 * 1024;

    /// Moves `len` bytes through a limited writer into a limited reader; returns the time.
    async fn transfer(len: usize) -> Duration {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut writer = Limited::new(a, RATE);
        let mut reader = Limited::new(b, RATE);
        let start = std::time::Instant::now();
        let send = tokio::spawn(async move {
            let data = vec![7u8; len];
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        send.await.unwrap();
        assert_eq!(got.len(), len);
        assert!(got.iter().all(|&b| b == 7));
        start.elapsed()
    }

    #[tokio::test]
    async fn the_rate_holds_in_both_directions() {
        // One burst passes at once; the rest at RATE: 512 KiB take about 1.9 s.
        let len = 512 * 1024;
        let took = transfer(len).await;
        let floor = (len as u64 - burst(RATE)) as f64 / RATE as f64;
        assert!(
            took.as_secs_f64() >= floor * 0.95,
            "{len} bytes at {RATE} B/s took {took:?}, less than {floor:.2} s"
        );
        assert!(
            took.as_secs_f64() <= floor * 1.5 + 0.5,
            "{len} bytes at {RATE} B/s took {took:?}, far more than {floor:.2} s"
        );
    }

    #[tokio::test]
    async fn a_small_transfer_is_not_delayed() {
        let took = transfer(burst(RATE) as usize).await;
        assert!(took < Duration::from_millis(300), "took {took:?}");
    }

    #[test]
    fn bursts_are_bounded() {
        assert_eq!(burst(1024), 1024);
        assert_eq!(burst(500 * 1024), 51200);
        assert_eq!(burst(1 << 30), 1 << 20);
    }
}
