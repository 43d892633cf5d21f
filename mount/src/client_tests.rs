//! Client tests against a scripted fake agent over an in-memory duplex stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kmount_proto::{MAGIC, PROTOCOL_VERSION, RelPath};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf, duplex, split};
use tokio::time::timeout;

use super::*;
use crate::error::FsError;

fn pair() -> (BoxedStream, DuplexStream) {
    let (ours, theirs) = duplex(1 << 20);
    let (r, w) = split(ours);
    let stream = BoxedStream {
        reader: Box::new(r),
        writer: Box::new(w),
        child: None,
        stderr: None,
    };
    (stream, theirs)
}

struct FakeAgent {
    r: ReadHalf<DuplexStream>,
    w: WriteHalf<DuplexStream>,
}

impl FakeAgent {
    fn new(stream: DuplexStream) -> Self {
        let (r, w) = split(stream);
        Self { r, w }
    }

    async fn send(&mut self, msg: &FromAgent) {
        self.w.write_all(&encode(msg).unwrap()).await.unwrap();
        self.w.flush().await.unwrap();
    }

    async fn recv(&mut self) -> Option<ToAgent> {
        read_frame_async(&mut self.r)
            .await
            .unwrap()
            .map(|p| decode(&p).unwrap())
    }

    async fn recv_request(&mut self) -> Request {
        match self.recv().await {
            Some(ToAgent::Request(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    async fn reply(&mut self, id: u64, result: Result<Done, WireError>) {
        self.send(&FromAgent::Reply(Reply { id, result })).await;
    }

    /// Hello both ways and the client's ping, as a healthy agent does them.
    async fn accept(stream: DuplexStream, features: u64) -> Self {
        let mut a = Self::new(stream);
        a.send(&FromAgent::Hello(Hello::new(features, "fake-agent 0")))
            .await;
        match a.recv().await {
            Some(ToAgent::Hello(h)) => assert_eq!(h.magic, MAGIC),
            other => panic!("expected the client's hello, got {other:?}"),
        }
        let ping = a.recv_request().await;
        assert_eq!(ping.op, Op::Ping);
        a.reply(ping.id, Ok(Done::Ok)).await;
        a
    }
}

async fn connected(features: u64) -> (Client, FakeAgent) {
    let (stream, theirs) = pair();
    let agent = tokio::spawn(FakeAgent::accept(theirs, features));
    let client = Client::from_stream(stream, "the fake agent").await.unwrap();
    (client, agent.await.unwrap())
}

fn read_op(handle: u64) -> Op {
    Op::Read {
        handle,
        offset: 0,
        len: 8,
    }
}

fn handle_of(op: &Op) -> u64 {
    match op {
        Op::Read { handle, .. } => *handle,
        other => panic!("unexpected op {other:?}"),
    }
}

#[tokio::test]
async fn replies_out_of_order_reach_their_callers() {
    let (client, mut agent) = connected(0).await;
    let calls: Vec<_> = (0..50u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { (i, c.call(read_op(i), None).await) })
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..50 {
        requests.push(agent.recv_request().await);
    }
    for req in requests.iter().rev() {
        let h = handle_of(&req.op);
        agent
            .reply(req.id, Ok(Done::Data(h.to_le_bytes().to_vec())))
            .await;
    }
    for call in calls {
        let (i, result) = call.await.unwrap();
        assert_eq!(result.unwrap(), Done::Data(i.to_le_bytes().to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_in_flight_at_once() {
    const N: u64 = 2000;
    let (client, mut agent) = connected(0).await;
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { (i, c.call(read_op(i), None).await) })
        })
        .collect();
    // Every request arrives before any reply is sent: no call waits for another's reply.
    let mut requests = Vec::new();
    for _ in 0..N {
        requests.push(agent.recv_request().await);
    }
    let mut ids: Vec<u64> = requests.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, N, "request ids are unique");
    // Answer in a scrambled order.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (i * 7919) % requests.len());
    for i in order {
        let req = &requests[i];
        agent
            .reply(
                req.id,
                Ok(Done::Data(handle_of(&req.op).to_le_bytes().to_vec())),
            )
            .await;
    }
    for call in calls {
        let (i, result) = timeout(Duration::from_secs(10), call)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(result.unwrap(), Done::Data(i.to_le_bytes().to_vec()));
    }
}

#[tokio::test]
async fn a_cut_stream_fails_pending_and_later_calls_at_once() {
    let (client, mut agent) = connected(0).await;
    let calls: Vec<_> = (0..10u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.call(read_op(i), None).await })
        })
        .collect();
    for _ in 0..10 {
        agent.recv_request().await;
    }
    drop(agent);
    for call in calls {
        let err = timeout(Duration::from_secs(2), call)
            .await
            .expect("a pending call hangs after the stream was cut")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
        assert_eq!(FsError::from(err).errno, libc::EIO);
    }
    assert!(!client.is_connected());
    let later = timeout(Duration::from_secs(2), client.call(Op::Ping, None))
        .await
        .expect("a call after the cut hangs")
        .unwrap_err();
    assert_eq!(FsError::from(later).errno, libc::EIO);
}

#[tokio::test]
async fn a_stream_cut_mid_frame_fails_pending_calls() {
    let (client, mut agent) = connected(0).await;
    let call = tokio::spawn({
        let c = client.clone();
        async move { c.call(Op::Ping, None).await }
    });
    let req = agent.recv_request().await;
    let frame = encode(&FromAgent::Reply(Reply {
        id: req.id,
        result: Ok(Done::Ok),
    }))
    .unwrap();
    agent.w.write_all(&frame[..frame.len() - 1]).await.unwrap();
    agent.w.flush().await.unwrap();
    drop(agent);
    let err = timeout(Duration::from_secs(2), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
}

#[tokio::test]
async fn remote_errors_keep_their_errno() {
    let (client, mut agent) = connected(0).await;
    let call = tokio::spawn({
        let c = client.clone();
        async move {
            c.call(
                Op::Lookup {
                    path: RelPath::new(b"x".to_vec()).unwrap(),
                },
                None,
            )
            .await
        }
    });
    let req = agent.recv_request().await;
    agent
        .reply(req.id, Err(WireError::new(libc::EACCES, "denied")))
        .await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        CallError::Remote(WireError::new(libc::EACCES, "denied"))
    );
    assert_eq!(FsError::from(err).errno, libc::EACCES);
    assert!(client.is_connected());
}

#[tokio::test]
async fn the_caller_travels_with_the_request() {
    let (client, mut agent) = connected(features::IDENTITY).await;
    assert_eq!(client.features(), features::IDENTITY);
    assert_eq!(client.peer().software, "fake-agent 0");
    let caller = Caller {
        uid: 1000,
        gid: 100,
        groups: vec![4, 27],
    };
    let call = tokio::spawn({
        let (c, caller) = (client.clone(), caller.clone());
        async move { c.call(Op::Statfs, Some(caller)).await }
    });
    let req = agent.recv_request().await;
    assert_eq!(req.caller, Some(caller));
    agent.reply(req.id, Ok(Done::Ok)).await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn features_are_those_both_ends_have() {
    let (client, _agent) = connected(0).await;
    assert_eq!(client.features(), 0);
    let (client, _agent) = connected(features::IDENTITY | (1 << 40)).await;
    assert_eq!(client.features(), features::IDENTITY);
}

#[tokio::test]
async fn dropping_every_client_closes_the_stream() {
    let (client, mut agent) = connected(0).await;
    let other = client.clone();
    drop(client);
    drop(other);
    let end = timeout(Duration::from_secs(2), agent.recv()).await.unwrap();
    assert!(end.is_none(), "expected end of stream, got {end:?}");
}

#[tokio::test]
async fn version_mismatch_names_both_versions() {
    let (stream, theirs) = pair();
    tokio::spawn(async move {
        let mut a = FakeAgent::new(theirs);
        let mut hello = Hello::new(0, "kmount-agent 9.9");
        hello.version = PROTOCOL_VERSION + 1;
        a.send(&FromAgent::Hello(hello)).await;
        while a.recv().await.is_some() {}
    });
    let err = Client::from_stream(stream, "the fake agent")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Version { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("version {PROTOCOL_VERSION}")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{msg}"
    );
    assert!(msg.contains("kmount-agent 9.9"), "{msg}");
}

#[tokio::test]
async fn the_agent_user_comes_with_the_hello_exchange() {
    let (stream, theirs) = pair();
    tokio::spawn(async move {
        let mut a = FakeAgent::new(theirs);
        a.send(&FromAgent::Hello(Hello::new(features::RUNS_AS, "fake")))
            .await;
        let Some(ToAgent::Hello(h)) = a.recv().await else {
            panic!("no hello from the client")
        };
        assert_ne!(h.features & features::RUNS_AS, 0);
        a.send(&FromAgent::RunsAs {
            uid: 1000,
            gid: 1001,
            groups: vec![1001, 2000],
        })
        .await;
        let ping = a.recv_request().await;
        a.reply(ping.id, Ok(Done::Ok)).await;
        while a.recv().await.is_some() {}
    });
    let client = Client::from_stream(stream, "the fake agent").await.unwrap();
    assert_eq!(client.agent_user(), Some((1000, 1001)));
    assert_eq!(client.agent_groups(), [1001, 2000]);
    // An agent that does not say leaves it unknown.
    let (client, _agent) = connected(0).await;
    assert_eq!(client.agent_user(), None);
    assert!(client.agent_groups().is_empty());
}

#[tokio::test]
async fn fatal_after_hello_is_shown_verbatim() {
    const WHY: &str = "kmount-agent: /srv/app does not exist";
    let (stream, theirs) = pair();
    tokio::spawn(async move {
        let mut a = FakeAgent::new(theirs);
        a.send(&FromAgent::Hello(Hello::new(0, "fake"))).await;
        a.send(&FromAgent::Fatal(WHY.to_string())).await;
    });
    let err = Client::from_stream(stream, "the fake agent")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Agent(_)), "{err:?}");
    assert_eq!(err.to_string(), WHY);
}

#[tokio::test]
async fn text_instead_of_a_hello_is_shown() {
    let (stream, theirs) = pair();
    tokio::spawn(async move {
        let mut a = FakeAgent::new(theirs);
        a.w.write_all(b"sh: 1: kmount-agent: not found\n")
            .await
            .unwrap();
        a.w.flush().await.unwrap();
        while a.recv().await.is_some() {}
    });
    let err = Client::from_stream(stream, "the fake agent")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClientError::NoSession { .. }), "{err:?}");
    assert!(msg.contains("kmount-agent: not found"), "{msg}");
    assert!(msg.starts_with("the fake agent did not start"), "{msg}");
}

#[tokio::test]
async fn an_empty_stream_is_reported() {
    let (stream, theirs) = pair();
    drop(theirs);
    let err = Client::from_stream(stream, "the fake agent")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed the stream"), "{err}");
}

#[tokio::test]
async fn a_missing_agent_binary_is_named() {
    let connector = LocalConnector::new(
        "/nonexistent/kmount-agent".into(),
        "/tmp".into(),
        Vec::new(),
    );
    let err = Client::connect(&connector).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClientError::Spawn { .. }), "{err:?}");
    assert!(msg.contains("/nonexistent/kmount-agent"), "{msg}");
}

#[tokio::test]
async fn the_stderr_of_a_failing_command_is_shown() {
    // `sh -c SCRIPT ROOT`: the root becomes $0 of the script.
    let connector = LocalConnector::new(
        "/bin/sh".into(),
        "/srv/x".into(),
        vec!["-c".into(), "echo \"cannot serve $0\" >&2; exit 3".into()],
    );
    let err = Client::connect(&connector).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClientError::NoSession { .. }), "{err:?}");
    assert!(msg.contains("cannot serve /srv/x"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
}

/// Hands out in-memory streams; the test side of each arrives on `agents_rx`. Fails while
/// `refuse` is set.
struct FakeConnector {
    agents_tx: mpsc::UnboundedSender<DuplexStream>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    connects: Arc<AtomicU64>,
}

impl Connector for FakeConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            self.connects.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) {
                return Err(io::Error::other("no agent right now"));
            }
            let (stream, theirs) = pair();
            self.agents_tx
                .send(theirs)
                .map_err(|_| io::Error::other("test over"))?;
            Ok(stream)
        })
    }

    fn describe(&self) -> String {
        "the fake agent".to_string()
    }
}

struct Reconnecting {
    client: Client,
    agents_rx: mpsc::UnboundedReceiver<DuplexStream>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    connects: Arc<AtomicU64>,
    features: u64,
}

impl Reconnecting {
    async fn new() -> (Self, FakeAgent) {
        Self::with(features::TREE).await
    }

    async fn with(features: u64) -> (Self, FakeAgent) {
        let (agents_tx, mut agents_rx) = mpsc::unbounded_channel();
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let connector = Arc::new(FakeConnector {
            agents_tx,
            refuse: refuse.clone(),
            connects: connects.clone(),
        });
        let client = tokio::spawn(Client::connect_shared(connector));
        let agent = FakeAgent::accept(agents_rx.recv().await.unwrap(), features).await;
        let client = client.await.unwrap().unwrap();
        (
            Self {
                client,
                agents_rx,
                refuse,
                connects,
                features,
            },
            agent,
        )
    }

    async fn next_agent(&mut self) -> FakeAgent {
        let theirs = timeout(Duration::from_secs(5), self.agents_rx.recv())
            .await
            .expect("no reconnection")
            .unwrap();
        FakeAgent::accept(theirs, self.features).await
    }
}

fn lookup(name: &str) -> Op {
    Op::Lookup {
        path: RelPath::new(name.as_bytes().to_vec()).unwrap(),
    }
}

#[tokio::test]
async fn a_broken_stream_is_replaced_and_reads_go_out_again() {
    let (mut r, mut agent) = Reconnecting::new().await;
    let mut events = r.client.take_events().unwrap();
    assert_eq!(r.client.generation(), 1);
    // in flight when the stream breaks: a read (sent again) and a change (not)
    let read = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(lookup("x"), None).await }
    });
    let change = tokio::spawn({
        let c = r.client.clone();
        async move {
            c.call(
                Op::Mkdir {
                    path: RelPath::new(b"d".to_vec()).unwrap(),
                    mode: 0o755,
                },
                None,
            )
            .await
        }
    });
    let mut ops = [agent.recv_request().await.op, agent.recv_request().await.op];
    ops.sort_by_key(|o| format!("{o:?}"));
    assert!(matches!(ops[0], Op::Lookup { .. }), "{ops:?}");
    assert!(matches!(ops[1], Op::Mkdir { .. }), "{ops:?}");
    drop(agent);
    let err = timeout(Duration::from_secs(5), change)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
    assert!(matches!(
        timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap(),
        Some(ClientEvent::Disconnected(_))
    ));

    let mut agent = r.next_agent().await;
    let again = agent.recv_request().await;
    assert_eq!(again.op, lookup("x"));
    agent.reply(again.id, Ok(Done::Data(b"y".to_vec()))).await;
    assert_eq!(
        read.await.unwrap().unwrap(),
        Done::Data(b"y".to_vec()),
        "the read waited for the new stream"
    );
    assert_eq!(
        timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap(),
        Some(ClientEvent::Reconnected { generation: 2 })
    );
    assert_eq!(r.client.generation(), 2);
    assert!(r.client.is_connected());
    // A handle of the first session is void on the second.
    let err = r.client.call_in(1, read_op(7), None).await.unwrap_err();
    assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
    let (done, generation) = tokio::join!(r.client.call_gen(Op::Ping, None), async {
        let req = agent.recv_request().await;
        agent.reply(req.id, Ok(Done::Ok)).await;
    })
    .0
    .unwrap();
    assert_eq!((done, generation), (Done::Ok, 2));
}

#[tokio::test]
async fn calls_fail_after_the_remote_timeout_while_reconnecting_fails() {
    let (mut r, agent) = Reconnecting::new().await;
    r.client.set_remote_timeout(Duration::from_millis(300));
    r.refuse.store(true, Ordering::SeqCst);
    drop(agent);
    // Give the reader a moment to notice.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let err = timeout(Duration::from_secs(5), r.client.call(Op::Statfs, None))
        .await
        .expect("a call hangs while the agent is away")
        .unwrap_err();
    assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
    assert!(err.to_string().contains("did not come back"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(matches!(r.client.status(), LinkStatus::Reconnecting { .. }));
    // It keeps trying, with backoff, and comes back once the agent is there again.
    r.refuse.store(false, Ordering::SeqCst);
    let mut agent = r.next_agent().await;
    assert!(
        r.connects.load(Ordering::SeqCst) >= 3,
        "tried again and again"
    );
    let call = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(Op::Statfs, None).await }
    });
    let req = agent.recv_request().await;
    agent.reply(req.id, Ok(Done::Ok)).await;
    assert_eq!(call.await.unwrap().unwrap(), Done::Ok);
}

#[tokio::test]
async fn remote_changes_reach_the_events_channel_in_order() {
    let (client, mut agent) = connected(features::WATCH).await;
    // Nobody listens yet: dropped.
    agent
        .send(&FromAgent::Events(vec![kmount_proto::Event::Remove {
            path: RelPath::new(b"early".to_vec()).unwrap(),
        }]))
        .await;
    // A round trip makes sure the early batch was read before the receiver is taken.
    let ping = tokio::spawn({
        let c = client.clone();
        async move { c.call(Op::Ping, None).await }
    });
    let req = agent.recv_request().await;
    agent.reply(req.id, Ok(Done::Ok)).await;
    ping.await.unwrap().unwrap();
    let mut events = client.take_events().unwrap();
    assert!(client.take_events().is_none(), "one receiver");
    for name in ["a", "b"] {
        agent
            .send(&FromAgent::Events(vec![kmount_proto::Event::Remove {
                path: RelPath::new(name.as_bytes().to_vec()).unwrap(),
            }]))
            .await;
    }
    for name in ["a", "b"] {
        let got = timeout(Duration::from_secs(2), events.recv())
            .await
            .unwrap();
        assert_eq!(
            got,
            Some(ClientEvent::Changes {
                events: vec![kmount_proto::Event::Remove {
                    path: RelPath::new(name.as_bytes().to_vec()).unwrap(),
                }],
                since: 0,
            })
        );
    }
}

fn some_attr() -> kmount_proto::Attr {
    let t = kmount_proto::Timespec::default();
    kmount_proto::Attr {
        ino: 1,
        dev: 1,
        mode: 0o100644,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        blksize: 4096,
        atime: t,
        mtime: t,
        ctime: t,
    }
}

impl FakeAgent {
    /// Answers the session set-up: the read of `.kmountignore` (with `text`, or ENOENT) and
    /// the rules; returns the rules sent.
    async fn serve_rules(&mut self, text: Option<&str>) -> RulesConfig {
        let read = self.recv_request().await;
        let Op::ReadPath { path, offset, len } = &read.op else {
            panic!("the session did not start with reading .kmountignore: {read:?}")
        };
        assert_eq!((path.as_bytes(), *offset), (&b".kmountignore"[..], 0));
        assert!(*len >= 64 << 10, "{len}");
        let answer = match text {
            Some(t) => Ok(Done::Content {
                attr: some_attr(),
                data: t.as_bytes().to_vec(),
                compressed: false,
            }),
            None => Err(WireError::new(libc::ENOENT, "no such file")),
        };
        self.reply(read.id, answer).await;
        let set = self.recv_request().await;
        let Op::SetRules { rules } = set.op else {
            panic!("expected SetRules after reading .kmountignore, got {set:?}")
        };
        self.reply(set.id, Ok(Done::Ok)).await;
        rules
    }
}

fn user_rules() -> RulesConfig {
    RulesConfig {
        exclude: vec!["tmp/".into()],
        ..Default::default()
    }
}

fn class(c: &Client, path: &str) -> kmount_proto::rules::Class {
    c.rules().class(std::path::Path::new(path), false)
}

#[tokio::test]
async fn rules_and_kmountignore_go_first_in_every_session() {
    use kmount_proto::rules::Class;
    let (mut r, mut agent) = Reconnecting::with(features::RULES | features::JOURNAL).await;
    let mut events = r.client.take_events().unwrap();
    r.client.set_rules(&user_rules()).unwrap();
    assert_eq!(class(&r.client, "tmp/x"), Class::Excluded);
    // The first request after set_rules waits for the session set-up.
    let call = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(lookup("x"), None).await }
    });
    let text = "out/\n[local-only]\n*.bak\n";
    let sent = agent.serve_rules(Some(text)).await;
    assert_eq!(sent.exclude, user_rules().exclude);
    assert_eq!(
        sent.kmountignore,
        Some((PathBuf::from(".kmountignore"), text.to_string()))
    );
    let req = agent.recv_request().await;
    assert_eq!(req.op, lookup("x"));
    agent.reply(req.id, Ok(Done::Ok)).await;
    call.await.unwrap().unwrap();
    assert_eq!(class(&r.client, "out/a.o"), Class::Excluded);
    assert_eq!(class(&r.client, "a.bak"), Class::LocalOnly);
    assert_eq!(class(&r.client, "tmp/x"), Class::Excluded);
    // Later requests go straight out.
    let ping = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(Op::Ping, None).await }
    });
    let req = agent.recv_request().await;
    assert_eq!(req.op, Op::Ping);
    agent.reply(req.id, Ok(Done::Ok)).await;
    ping.await.unwrap().unwrap();

    // A new session: the rules go again, before the replayed read, with the file as it is now
    // (a bad line: left out, the session goes on).
    let read = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(lookup("y"), None).await }
    });
    let req = agent.recv_request().await;
    assert_eq!(req.op, lookup("y"));
    drop(agent);
    let mut agent = r.next_agent().await;
    let sent = agent.serve_rules(Some("a[z-a]\n")).await;
    assert_eq!(sent.kmountignore, None, "the bad file is not sent");
    assert_eq!(sent.exclude, user_rules().exclude);
    let again = agent.recv_request().await;
    assert_eq!(again.op, lookup("y"), "the replay comes after the rules");
    agent.reply(again.id, Ok(Done::Ok)).await;
    read.await.unwrap().unwrap();
    assert_eq!(
        class(&r.client, "out/a.o"),
        Class::Synced,
        "the old file is gone"
    );
    assert_eq!(class(&r.client, "tmp/x"), Class::Excluded);
    let mut reconnected = false;
    while let Ok(Some(e)) = timeout(Duration::from_secs(2), events.recv()).await {
        if e == (ClientEvent::Reconnected { generation: 2 }) {
            reconnected = true;
            break;
        }
    }
    assert!(reconnected);

    // Once more, with no .kmountignore at all.
    drop(agent);
    let mut agent = r.next_agent().await;
    let sent = agent.serve_rules(None).await;
    assert_eq!(sent.kmountignore, None);
    assert_eq!(r.client.requests_sent("SetRules"), 3);
    assert_eq!(r.client.requests_sent(KMOUNTIGNORE_READS), 3);
    assert_eq!(
        r.client.requests_sent("ReadPath"),
        0,
        "counted apart from file reads"
    );
}

#[tokio::test]
async fn an_agent_without_rules_gets_none() {
    let (client, mut agent) = connected(features::TREE | features::JOURNAL).await;
    client.set_rules(&user_rules()).unwrap();
    let call = tokio::spawn({
        let c = client.clone();
        async move { c.call(Op::Ping, None).await }
    });
    let req = agent.recv_request().await;
    assert_eq!(req.op, Op::Ping, "nothing is sent before the request");
    agent.reply(req.id, Ok(Done::Ok)).await;
    call.await.unwrap().unwrap();
    assert_eq!(client.requests_sent("SetRules"), 0);
    assert!(client.shared.rules_warned.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_bad_user_rule_is_an_error_at_once() {
    let (client, _agent) = connected(features::RULES).await;
    let e = client
        .set_rules(&RulesConfig {
            exclude: vec!["a[z-a]".into()],
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("a[z-a]"), "{e}");
}

#[tokio::test]
async fn a_silent_agent_is_given_up_and_replaced_within_the_remote_timeout() {
    let (mut r, mut agent) = Reconnecting::new().await;
    r.client.set_remote_timeout(Duration::from_millis(400));
    // The agent answers nothing more (a stopped process): the call and the watchdog's ping
    // go unanswered.
    let started = std::time::Instant::now();
    let call = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(Op::Statfs, None).await }
    });
    let first = agent.recv_request().await;
    assert_eq!(first.op, Op::Statfs);
    let ping = agent.recv_request().await;
    assert_eq!(ping.op, Op::Ping, "the watchdog asks for a sign of life");
    let err = timeout(Duration::from_secs(5), call)
        .await
        .expect("the call hangs on a silent agent")
        .unwrap()
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, CallError::Disconnected(_)), "{err:?}");
    assert!(err.to_string().contains("has not answered"), "{err}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // A new stream replaced the silent one: the next call is answered.
    let mut next = r.next_agent().await;
    let call = tokio::spawn({
        let c = r.client.clone();
        async move { c.call(Op::Statfs, None).await }
    });
    let req = next.recv_request().await;
    next.reply(req.id, Ok(Done::Ok)).await;
    assert_eq!(call.await.unwrap().unwrap(), Done::Ok);
    drop(agent);
}

#[tokio::test]
async fn a_slow_request_of_a_live_agent_is_not_cut() {
    let (client, mut agent) = connected(0).await;
    client.set_remote_timeout(Duration::from_millis(200));
    let call = tokio::spawn({
        let c = client.clone();
        async move { c.call(Op::Statfs, None).await }
    });
    let slow = agent.recv_request().await;
    // Pings are answered at once; the request itself takes five timeouts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(ToAgent::Request(p))) =
            timeout(Duration::from_millis(50), agent.recv()).await
        {
            assert_eq!(p.op, Op::Ping);
            agent.reply(p.id, Ok(Done::Ok)).await;
        }
    }
    agent.reply(slow.id, Ok(Done::Ok)).await;
    assert_eq!(call.await.unwrap().unwrap(), Done::Ok);
    assert!(client.is_connected());
}

/// The first stream's watchdog may start before its client is complete (the race that
/// stopped it for good on a multi-threaded runtime): it must watch all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_stream_is_watched_too() {
    for _ in 0..10 {
        let (client, mut agent) = connected(0).await;
        client.set_remote_timeout(Duration::from_millis(200));
        let call = tokio::spawn({
            let c = client.clone();
            async move { c.call(Op::Statfs, None).await }
        });
        let _silent = agent.recv_request().await;
        let err = timeout(Duration::from_secs(3), call)
            .await
            .expect("the call hangs on a silent agent")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("has not answered"), "{err}");
    }
}
