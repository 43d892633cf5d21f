//! A fault-injecting transport, for tests: [`FaultyConnector`] wraps any [`Connector`] so that
//! the byte streams it makes can be cut (at once, or after a random number of bytes, in the
//! middle of a frame), stalled (nothing moves for a while, the connection stays open) or
//! delayed (every read waits a fixed time), as a bad network or a dying peer would.
//!
//! A cut stream fails every later read and write; the client then reconnects through the
//! connector like after any broken link, and the process at the other end (the agent) is killed
//! when the old stream is dropped, whatever it was doing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::{BoxedStream, ConnectFuture, Connector};

/// What the streams of a [`FaultyConnector`] suffer; shared with the test that steers them.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<FaultState>,
    /// Bumped by [`Faults::cut_now`]: streams made before it are cut.
    epoch: AtomicU64,
    /// Streams cut so far (by any cause).
    cuts: AtomicU64,
    /// Streams made so far.
    streams: AtomicU64,
}

#[derive(Debug, Default)]
struct FaultState {
    /// Random cuts still to make: each new stream gets a budget of bytes (both directions)
    /// drawn from `budget`, and is cut when it is spent.
    random_cuts: u64,
    budget: (u64, u64),
    rng: u64,
    stalled_until: Option<Instant>,
    delay: Duration,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The next `count` streams are each cut after a random number of bytes in
    /// `min_bytes..=max_bytes` (reads and writes together), mid-frame as often as not.
    pub fn random_cuts(&self, count: u64, min_bytes: u64, max_bytes: u64, seed: u64) {
        let mut st = lock(&self.state);
        st.random_cuts = count;
        st.budget = (min_bytes.max(1), max_bytes.max(min_bytes.max(1)));
        st.rng = seed | 1;
    }

    /// Cuts every stream that exists now.
    pub fn cut_now(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Nothing moves on any stream for `d` (reads and writes wait; nothing fails).
    pub fn stall(&self, d: Duration) {
        lock(&self.state).stalled_until = Some(Instant::now() + d);
    }

    /// Every read waits `d` before it is delivered (a slow link, one way).
    pub fn delay(&self, d: Duration) {
        lock(&self.state).delay = d;
    }

    /// Streams cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Acquire)
    }

    /// Streams made so far (the first connection included).
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Acquire)
    }

    /// Random cuts not yet made.
    pub fn cuts_left(&self) -> u64 {
        lock(&self.state).random_cuts
    }

    fn new_link(self: &Arc<Self>) -> Arc<Link> {
        self.streams.fetch_add(1, Ordering::AcqRel);
        let mut st = lock(&self.state);
        let budget = if st.random_cuts > 0 {
            st.random_cuts -= 1;
            let (lo, hi) = st.budget;
            // xorshift64: reproducible from the seed.
            st.rng ^= st.rng << 13;
            st.rng ^= st.rng >> 7;
            st.rng ^= st.rng << 17;
            lo + st.rng % (hi - lo + 1)
        } else {
            u64::MAX
        };
        Arc::new(Link {
            faults: self.clone(),
            epoch: self.epoch.load(Ordering::Acquire),
            budget: AtomicU64::new(budget),
            broken: AtomicBool::new(false),
        })
    }

    /// How long the streams must wait before moving, if they must.
    fn stalled(&self) -> Option<Instant> {
        lock(&self.state)
            .stalled_until
            .filter(|t| *t > Instant::now())
    }

    fn read_delay(&self) -> Duration {
        lock(&self.state).delay
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One stream's fate, shared by its two halves.
#[derive(Debug)]
struct Link {
    faults: Arc<Faults>,
    epoch: u64,
    /// Bytes it may still carry.
    budget: AtomicU64,
    broken: AtomicBool,
}

impl Link {
    fn is_broken(&self) -> bool {
        if !self.broken.load(Ordering::Acquire)
            && self.faults.epoch.load(Ordering::Acquire) != self.epoch
        {
            self.break_now();
        }
        self.broken.load(Ordering::Acquire)
    }

    fn break_now(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            self.faults.cuts.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes up to `want` bytes of the budget; 0 when it is spent (the link is then broken).
    fn take(&self, want: usize) -> usize {
        let left = self.budget.load(Ordering::Acquire);
        let n = (want as u64).min(left);
        self.budget.fetch_sub(n, Ordering::AcqRel);
        if n == 0 && want > 0 {
            self.break_now();
        }
        n as usize
    }

    fn spent(&self, n: usize) {
        if n > 0 && self.budget.load(Ordering::Acquire) == 0 {
            self.break_now();
        }
    }

    fn cut_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "cut by the fault injector")
    }
}

/// Waits out a stall or a delay; `Ready` once there is none.
#[derive(Default)]
struct Waiter {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Waiter {
    fn poll_until(&mut self, cx: &mut Context<'_>, until: Option<Instant>) -> Poll<()> {
        let Some(until) = until else {
            self.sleep = None;
            return Poll::Ready(());
        };
        let deadline = tokio::time::Instant::from_std(until);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.sleep = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct FaultyReader {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    link: Arc<Link>,
    wait: Waiter,
    /// When the read in progress may be delivered (a delayed link).
    due: Option<Instant>,
}

impl AsyncRead for FaultyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.link.is_broken() {
            return Poll::Ready(Err(this.link.cut_error()));
        }
        let stalled = this.link.faults.stalled();
        if this.wait.poll_until(cx, stalled).is_pending() {
            return Poll::Pending;
        }
        let delay = this.link.faults.read_delay();
        if !delay.is_zero() {
            let due = *this.due.get_or_insert_with(|| Instant::now() + delay);
            if this.wait.poll_until(cx, Some(due)).is_pending() {
                return Poll::Pending;
            }
        }
        let allowed = this.link.take(buf.remaining());
        if allowed == 0 {
            return Poll::Ready(Err(this.link.cut_error()));
        }
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(allowed));
        let r = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        // Give back what was not used.
        this.link
            .budget
            .fetch_add((allowed - n) as u64, Ordering::AcqRel);
        match r {
            Poll::Ready(Ok(())) => {
                buf.advance(n);
                this.due = None;
                this.link.spent(n);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

struct FaultyWriter {
    inner: Box<dyn AsyncWrite + Send + Unpin>,
    link: Arc<Link>,
    wait: Waiter,
}

impl AsyncWrite for FaultyWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.link.is_broken() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "cut by the fault injector",
            )));
        }
        let stalled = this.link.faults.stalled();
        if this.wait.poll_until(cx, stalled).is_pending() {
            return Poll::Pending;
        }
        let allowed = this.link.take(data.len());
        if allowed == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "cut by the fault injector",
            )));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, &data[..allowed]);
        let n = match &r {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        this.link
            .budget
            .fetch_add((allowed - n) as u64, Ordering::AcqRel);
        this.link.spent(n);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.link.is_broken() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "cut by the fault injector",
            )));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A [`Connector`] whose streams suffer the [`Faults`] given.
pub struct FaultyConnector {
    inner: Arc<dyn Connector>,
    faults: Arc<Faults>,
}

impl FaultyConnector {
    pub fn new(inner: Arc<dyn Connector>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

impl Connector for FaultyConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let stream = self.inner.connect().await?;
            let link = self.faults.new_link();
            Ok(BoxedStream {
                reader: Box::new(FaultyReader {
                    inner: stream.reader,
                    link: link.clone(),
                    wait: Waiter::default(),
                    due: None,
                }),
                writer: Box::new(FaultyWriter {
                    inner: stream.writer,
                    link,
                    wait: Waiter::default(),
                }),
                child: stream.child,
                stderr: stream.stderr,
            })
        })
    }

    fn describe(&self) -> String {
        format!("{} (through the fault injector)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connector over an in-memory pipe pair; the far end echoes nothing, it only counts.
    struct Pipe(Mutex<Option<BoxedStream>>);

    impl Connector for Pipe {
        fn connect(&self) -> ConnectFuture<'_> {
            Box::pin(async move {
                lock(&self.0)
                    .take()
                    .ok_or_else(|| io::Error::other("only one stream"))
            })
        }
        fn describe(&self) -> String {
            "a pipe".into()
        }
    }

    fn pipe() -> (Arc<dyn Connector>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(near);
        let stream = BoxedStream {
            reader: Box::new(r),
            writer: Box::new(w),
            child: None,
            stderr: None,
        };
        (Arc::new(Pipe(Mutex::new(Some(stream)))), far)
    }

    #[tokio::test]
    async fn a_random_cut_stops_the_stream_within_its_budget() {
        let (inner, mut far) = pipe();
        let faults = Faults::new();
        faults.random_cuts(1, 100, 100, 7);
        let c = FaultyConnector::new(inner, faults.clone());
        let mut s = c.connect().await.unwrap();
        let mut sent = 0;
        let err = loop {
            match s.writer.write(&[1u8; 30]).await {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
        };
        assert_eq!(sent, 100, "cut exactly at its budget, mid-write");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(faults.cuts(), 1);
        let mut got = vec![0u8; 100];
        far.read_exact(&mut got).await.unwrap();
        // Reads fail too once cut.
        far.write_all(b"late").await.unwrap();
        assert!(s.reader.read(&mut [0u8; 4]).await.is_err());
    }

    #[tokio::test]
    async fn cut_now_breaks_live_streams_and_stall_holds_them() {
        let (inner, mut far) = pipe();
        let faults = Faults::new();
        let c = FaultyConnector::new(inner, faults.clone());
        let mut s = c.connect().await.unwrap();
        faults.stall(Duration::from_millis(200));
        let t = Instant::now();
        far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        s.reader.read_exact(&mut got).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(&got, b"hello");
        faults.cut_now();
        assert!(s.writer.write(b"x").await.is_err());
        assert_eq!(faults.cuts(), 1);
    }
}
