//! Limits every HTTP listener of the process keeps (the settings site, the IVR API and
//! the operator endpoint), so that clients which connect and then send slowly or
//! nothing cannot use up the file descriptors the mail pipeline shares with them.
//!
//! [`Guarded`] wraps an `axum::serve::Listener`: past `max_connections` open ones, or
//! `per_client` from one client (an IP address, an IPv6 one by its /64), a new
//! connection is closed at once. Each accepted
//! connection is a [`GuardedIo`], closed after `idle` without a byte either way (a
//! half-sent request, an idle keep-alive) and, where `lifetime` is set, after that long
//! whatever it does (a client trickling a byte now and then); a request being answered
//! then gets its answer first, within [`LATE_ANSWER`].
//! A request's head must be in within `head_within` of its first byte, whatever the
//! lifetime.
//!
//! Every server on a [`Guarded`] listener layers one of two middlewares (with a
//! connect-info type giving the connection's [`Answering`]), which tell the connection
//! that a request's head is in, so that its body is not taken for a late head:
//! [`keep_open_while_answering`] also has the idle limit wait while a handler runs (its
//! handler may wait on the state owner or a mail server longer than `idle`; hyper reads
//! the socket meanwhile, and that read would end the connection mid-answer);
//! [`note_request_head`] keeps the idle limit (the operator endpoint: a half-sent upload
//! is closed when idle).

use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::telemetry::{ConnectionLimit, Metrics};

/// What a listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one client ([`client_block`]: an IP address, an
    /// IPv6 one by its /64): one client cannot take them all.
    pub per_client: usize,
    /// A connection with no byte read or written for this long is closed.
    pub idle: Duration,
    /// A connection is closed this long after it opened, if set (once the answer to a
    /// request being answered then is out, within [`LATE_ANSWER`]).
    pub lifetime: Option<Duration>,
    /// A request's head (its line and headers) must be in within this long of its first
    /// byte, however it trickles in: a byte now and then, each within `idle`, would hold
    /// a connection without a lifetime for ever.
    pub head_within: Duration,
}

/// [`Limits::head_within`] of every listener: far longer than any client sending a
/// request at once needs.
pub(crate) const HEAD_WITHIN: Duration = Duration::from_secs(30);

impl Limits {
    /// The operator endpoint: scrapes and the operator's tools, from a few addresses;
    /// a provisioning upload may take long, as long as bytes flow. An upload's last
    /// lines wait, silent, for the state owner's answer: its idle limit is longer than
    /// that wait, so a late owner is answered as such, not with a closed connection.
    pub const OPERATOR: Limits = Limits {
        max_connections: 256,
        per_client: 64,
        idle: Duration::from_secs(crate::state::ANSWER_WITHIN.as_secs() + 30),
        lifetime: None,
        head_within: HEAD_WITHIN,
    };
}

/// Open connections, in all and per client address.
#[derive(Default)]
struct Open {
    all: AtomicUsize,
    by_client: DashMap<IpAddr, usize>,
}

/// A listener that keeps to [`Limits`].
pub struct Guarded<L> {
    inner: L,
    limits: Limits,
    open: Arc<Open>,
    /// For log lines and the refusals' count: `admin.listen`, `metrics.listen`, ...
    name: &'static str,
    /// Where refusals are counted (`callnotify_connections_refused_total`).
    metrics: Option<Metrics>,
    /// When a per-client refusal was last logged, and those since (of any client): one
    /// line every [`REFUSALS_LOGGED_EVERY`] per listener, not one per connection of a
    /// flood.
    refusals_logged: std::sync::Mutex<(Option<Instant>, u64)>,
}

/// How often a listener logs the connections it refused a client (behind a proxy, all
/// of them).
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// The address a client is counted under: an IPv6 address by its /64, the block one
/// subscriber line or host is given (one client, 2^64 addresses), an IPv4-mapped one as
/// the IPv4 address it is.
pub fn client_block(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

impl<L> Guarded<L> {
    pub fn new(inner: L, limits: Limits, name: &'static str) -> Self {
        Self { inner, limits, open: Arc::default(), name, metrics: None, refusals_logged: Default::default() }
    }

    /// Counts its refusals in `metrics`.
    pub fn counting_in(self, metrics: Metrics) -> Self {
        Self { metrics: Some(metrics), ..self }
    }

    fn refused(&self, limit: ConnectionLimit) {
        if let Some(metrics) = &self.metrics {
            metrics.connection_refused(self.name, limit);
        }
    }

    /// A slot for a connection from `client`, if the limits allow one.
    fn admit(&self, client: IpAddr) -> Option<Slot> {
        let client = client_block(client);
        let open = &self.open;
        if open.all.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
            open.all.fetch_sub(1, Ordering::AcqRel);
            self.refused(ConnectionLimit::ListenerFull);
            tracing::warn!(listener = self.name, %client, max = self.limits.max_connections, "connection refused: the listener is full");
            return None;
        }
        let mut count = open.by_client.entry(client).or_insert(0);
        if *count >= self.limits.per_client {
            drop(count);
            open.all.fetch_sub(1, Ordering::AcqRel);
            self.refused(ConnectionLimit::PerClient);
            // Behind a proxy every subscriber is this one client: said, but not once per
            // connection of one client's flood.
            let mut logged = self.refusals_logged.lock().unwrap_or_else(|e| e.into_inner());
            logged.1 += 1;
            if logged.0.is_none_or(|at| at.elapsed() >= REFUSALS_LOGGED_EVERY) {
                tracing::warn!(listener = self.name, %client, max = self.limits.per_client, refused = logged.1,
                    "connections refused: too many from this client (behind a proxy, raise admin.max_connections_per_client)");
                *logged = (Some(Instant::now()), 0);
            }
            return None;
        }
        *count += 1;
        Some(Slot { open: open.clone(), client })
    }
}

impl<L> axum::serve::Listener for Guarded<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: Unpin,
{
    type Io = GuardedIo<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            if let Some(slot) = self.admit(peer.ip()) {
                return (GuardedIo::new(io, slot, self.limits), peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection's place in the counts, given back when it closes.
struct Slot {
    open: Arc<Open>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.all.fetch_sub(1, Ordering::AcqRel);
        self.open.by_client.remove_if_mut(&self.client, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// The requests of one connection its server is answering now. Cheap to clone: every
/// clone counts for the same connection.
#[derive(Clone, Debug, Default)]
pub struct Answering(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    /// Requests being answered now.
    now: AtomicUsize,
    /// Requests begun on the connection so far: a head came in whole.
    begun: AtomicUsize,
}

impl Answering {
    /// Counts one request as being answered until the guard is dropped.
    pub fn begin(&self) -> AnsweringGuard {
        self.0.now.fetch_add(1, Ordering::AcqRel);
        self.0.begun.fetch_add(1, Ordering::AcqRel);
        AnsweringGuard(self.clone())
    }

    /// Counts one request as begun (its head in) without holding off the idle limit.
    fn head_in(&self) {
        self.0.begun.fetch_add(1, Ordering::AcqRel);
    }

    fn any(&self) -> bool {
        self.0.now.load(Ordering::Acquire) > 0
    }

    fn begun(&self) -> usize {
        self.0.begun.load(Ordering::Acquire)
    }
}

impl AsRef<Answering> for Answering {
    fn as_ref(&self) -> &Answering {
        self
    }
}

/// For a server that needs nothing else of the connection: its [`Answering`] as its
/// connect info ([`keep_open_while_answering`]`::<Answering>`).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Guarded<tokio::net::TcpListener>>>
    for Answering
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Guarded<tokio::net::TcpListener>>) -> Self {
        stream.io().answering()
    }
}

/// One request being answered, from [`Answering::begin`].
pub struct AnsweringGuard(Answering);

impl Drop for AnsweringGuard {
    fn drop(&mut self) {
        self.0 .0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Middleware: the request's connection is not closed as idle while its handler runs.
/// `C` is the server's connect-info type (`into_make_service_with_connect_info::<C>`);
/// a request without one (a test calling the router directly) is answered alike.
pub async fn keep_open_while_answering<C>(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response
where
    C: AsRef<Answering> + Clone + Send + Sync + 'static,
{
    let _answering = request.extensions().get::<ConnectInfo<C>>().map(|info| info.0.as_ref().begin());
    next.run(request).await
}

/// Middleware for a server whose idle limit holds while it answers (the operator
/// endpoint: a half-sent upload is closed when idle): the request's head is in, so its
/// connection is not closed for a late head ([`Limits::head_within`]) while its body
/// comes, however long it takes.
pub async fn note_request_head<C>(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response
where
    C: AsRef<Answering> + Clone + Send + Sync + 'static,
{
    if let Some(info) = request.extensions().get::<ConnectInfo<C>>() {
        info.0.as_ref().head_in();
    }
    next.run(request).await
}

/// How long past its lifetime a connection may still be answering a request: longer
/// than a handler waits for the state owner ([`crate::state::ANSWER_WITHIN`]).
pub const LATE_ANSWER: Duration = Duration::from_secs(crate::state::ANSWER_WITHIN.as_secs() + 30);

fn past_lifetime() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection open past its lifetime")
}

/// A connection that ends when idle too long, past its lifetime, or when a request's
/// head is not in within its time.
pub struct GuardedIo<T> {
    inner: T,
    idle_for: Duration,
    idle: Pin<Box<Sleep>>,
    lifetime: Option<Pin<Box<Sleep>>>,
    /// Past its lifetime with a request being answered: when it ends all the same.
    cut: Option<Pin<Box<Sleep>>>,
    /// [`Limits::head_within`].
    head_within: Duration,
    /// A request's first bytes came in: by when its head must be in.
    head: Option<Pin<Box<Sleep>>>,
    /// The requests begun ([`Answering`]) when last looked: one more, and a head is in.
    begun: usize,
    /// A request's head is in and its answer not yet going out: what is read is its body.
    in_request: bool,
    /// Requests its server is answering: no idleness meanwhile.
    answering: Answering,
    _slot: Slot,
}

impl<T> GuardedIo<T> {
    fn new(inner: T, slot: Slot, limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle_for: limits.idle,
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle)),
            lifetime: limits.lifetime.map(|l| Box::pin(tokio::time::sleep_until(now + l))),
            cut: None,
            head_within: limits.head_within,
            head: None,
            begun: 0,
            in_request: false,
            answering: Answering::default(),
            _slot: slot,
        }
    }

    /// The count of this connection's requests being answered, for the server's
    /// connect-info type ([`keep_open_while_answering`]).
    pub fn answering(&self) -> Answering {
        self.answering.clone()
    }

    /// Whether the connection is to end now (registering for the wake-up otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.lifetime.as_mut().is_some_and(|l| l.as_mut().poll(cx).is_ready()) {
            // A request being answered then gets its answer (its handler may have acted,
            // a password set): the connection ends at its next read or write once the
            // answer is out, or [`LATE_ANSWER`] past its lifetime whatever it does.
            let cut = self.cut.get_or_insert_with(|| Box::pin(tokio::time::sleep(LATE_ANSWER)));
            if !self.answering.any() || cut.as_mut().poll(cx).is_ready() {
                return Some(past_lifetime());
            }
        }
        if self.answering.any() {
            // Idleness starts again once the answer is out (its bytes reset it too).
            self.progressed();
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long"));
        }
        self.note_heads();
        if self.head.as_mut().is_some_and(|by| by.as_mut().poll(cx).is_ready()) {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "request head not in within its time"));
        }
        None
    }

    /// A request begun since last looked: its head is in, what comes is its body.
    fn note_heads(&mut self) {
        let begun = self.answering.begun();
        if begun != self.begun {
            self.begun = begun;
            self.in_request = true;
            self.head = None;
        }
    }

    fn progressed(&mut self) {
        let next = Instant::now() + self.idle_for;
        self.idle.as_mut().reset(next);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // Past its lifetime, a connection takes no new request (a request's
                    // body is read while it is being answered).
                    if me.lifetime.as_ref().is_some_and(|l| Instant::now() >= l.deadline()) && !me.answering.any() {
                        return Poll::Ready(Err(past_lifetime()));
                    }
                    me.note_heads();
                    if me.head.is_none() && !me.in_request && !me.answering.any() {
                        me.head = Some(Box::pin(tokio::time::sleep(me.head_within)));
                    }
                    me.progressed();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => me.expired(cx).map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    me.progressed();
                    // An answer going out: the request's head was in, and what is read
                    // next is the next request's; but after an interim answer
                    // (`100 Continue`) the request's body comes.
                    me.note_heads();
                    me.head = None;
                    if !data.starts_with(b"HTTP/1.1 1") {
                        me.in_request = false;
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => me.expired(cx).map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn guarded(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move {
            axum::serve(Guarded::new(listener, limits, "test"), app).await.unwrap();
        });
        (addr, server)
    }

    async fn get(addr: SocketAddr, from: &str) -> io::Result<String> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse().unwrap())?;
        let mut stream = socket.connect(addr).await?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    /// Refused connections are counted by listener and limit: behind a proxy every
    /// subscriber is one client, and its refusals (502s at the proxy) used to show
    /// nowhere but a debug log line.
    #[tokio::test]
    async fn refused_connections_are_counted_by_listener_and_limit() {
        let limits = Limits {
            max_connections: 2,
            per_client: 1,
            idle: Duration::from_secs(5),
            lifetime: None,
            head_within: HEAD_WITHIN,
        };
        let metrics = Metrics::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let guarded = Guarded::new(listener, limits, "admin.listen").counting_in(metrics.clone());
        let _server = tokio::spawn(async move { axum::serve(guarded, app).await.unwrap() });
        let refused = |limit: &str| {
            metrics
                .value(&format!(r#"callnotify_connections_refused_total{{listener="admin.listen",limit="{limit}"}}"#))
        };
        assert_eq!((refused("per_client"), refused("listener_full")), (Some(0.0), Some(0.0)), "there from the start");

        let _held = tokio::net::TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            assert_eq!(get(addr, "127.0.0.1").await.unwrap_or_default(), "", "a second from 127.0.0.1");
        }
        let _other = get_held(addr, "127.0.0.2").await;
        assert_eq!(get(addr, "127.0.0.3").await.unwrap_or_default(), "", "a third in all");
        assert_eq!((refused("per_client"), refused("listener_full")), (Some(2.0), Some(1.0)));
        assert_eq!(
            metrics.value(r#"callnotify_connections_refused_total{listener="admin.ivr_listen",limit="per_client"}"#),
            Some(0.0)
        );
    }

    /// A connection from `from` to `addr`, left open (once the listener took it).
    async fn get_held(addr: SocketAddr, from: &str) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        // Answered: the listener counts it open.
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 64];
        assert!(stream.read(&mut answer).await.unwrap() > 0);
        stream
    }

    /// A client with an IPv6 /64 is one client: its 2^64 addresses are counted together.
    #[test]
    fn an_ipv6_client_is_counted_by_its_64_block() {
        let block = |s: &str| client_block(s.parse().unwrap());
        assert_eq!(block("2001:db8:1:2::1"), block("2001:db8:1:2:ffff:ffff:ffff:fffe"));
        assert_ne!(block("2001:db8:1:2::1"), block("2001:db8:1:3::1"));
        assert_eq!(block("::ffff:192.0.2.7"), block("192.0.2.7"));
        assert_ne!(block("192.0.2.7"), block("192.0.2.8"));
    }

    /// A client holding its share of connections is refused more, and another client
    /// is still served; a connection that says nothing is closed when idle too long.
    #[tokio::test]
    async fn one_client_cannot_take_every_connection_and_idle_ones_are_closed() {
        let limits = Limits {
            max_connections: 100,
            per_client: 5,
            idle: Duration::from_millis(300),
            lifetime: None,
            head_within: HEAD_WITHIN,
        };
        let (addr, _server) = guarded(limits).await;
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The sixth from 127.0.0.1 is closed without an answer.
        let refused = get(addr, "127.0.0.1").await.unwrap_or_default();
        assert!(refused.is_empty(), "{refused}");
        assert!(get(addr, "127.0.0.2").await.unwrap().ends_with("ok"), "another client is served");

        // The held ones said nothing: closed after the idle time (read returns 0).
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        drop(held);
        // Their slots are given back.
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(a) = get(addr, "127.0.0.1").await {
                    if a.ends_with("ok") {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(served.is_ok(), "127.0.0.1 is served again once its connections closed");
    }

    /// A server whose one handler answers "answered" after `takes`.
    async fn answering_after(limits: Limits, takes: Duration) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(move || async move {
                    tokio::time::sleep(takes).await;
                    "answered"
                }),
            )
            .layer(axum::middleware::from_fn(keep_open_while_answering::<Answering>));
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<Answering>();
            axum::serve(Guarded::new(listener, limits, "test"), app).await.unwrap();
        });
        addr
    }

    /// Sends one keep-alive request on `stream` and reads its answer, or what came
    /// before the connection closed.
    async fn ask(stream: &mut tokio::net::TcpStream) -> String {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"answered") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// A client trickling a request's head a byte at a time, each within the idle limit
    /// (the operator endpoint has no lifetime): its connection was held for ever, and a
    /// few hundred such took every slot of the endpoint Prometheus scrapes. The head must
    /// now be in within `head_within` of its first byte; a body may take longer (an
    /// upload to `/provision`), and a kept-alive connection outlives it.
    #[tokio::test]
    async fn a_request_head_trickled_in_is_cut_off_and_bodies_and_kept_alive_connections_are_not() {
        head_limit_on(true).await;
        // The operator endpoint's way: the idle limit holds while answering, heads noted.
        head_limit_on(false).await;
    }

    async fn head_limit_on(keep_open_while_answering_it: bool) {
        let limits = Limits {
            max_connections: 10,
            per_client: 10,
            idle: Duration::from_millis(1_500),
            lifetime: None,
            head_within: Duration::from_millis(600),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async { "ok" }).post(|body: String| async move { format!("got {}", body.len()) }),
        );
        let app = if keep_open_while_answering_it {
            app.layer(axum::middleware::from_fn(keep_open_while_answering::<Answering>))
        } else {
            app.layer(axum::middleware::from_fn(note_request_head::<Answering>))
        };
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<Answering>();
            axum::serve(Guarded::new(listener, limits, "test"), app).await.unwrap();
        });

        let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
        trickle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut cut = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickle.write_all(b"X").await.is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut buf)).await {
                cut = true;
                break;
            }
        }
        assert!(cut, "a head trickled in for 5 s was let go on");

        // A body sent over twice `head_within`, its head at once.
        let mut upload = tokio::net::TcpStream::connect(addr).await.unwrap();
        upload.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\n\r\n").await.unwrap();
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            upload.write_all(b"x").await.unwrap();
        }
        let mut buf = [0u8; 1024];
        let n = upload.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("got 12"), "{}", String::from_utf8_lossy(&buf[..n]));

        // The same asking `100 Continue` first, as curl does for a large upload.
        let mut upload = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n";
        upload.write_all(head).await.unwrap();
        let n = upload.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&buf[..n]));
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            upload.write_all(b"x").await.unwrap();
        }
        let mut answer = Vec::new();
        while !answer.ends_with(b"got 12") {
            match upload.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        assert!(answer.ends_with(b"got 12"), "{}", String::from_utf8_lossy(&answer));

        // Kept alive for three times `head_within`, quiet well within the idle limit.
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            let n = kept.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }

    /// A handler that takes longer than the idle limit (a site save waiting for the
    /// state owner, a test mail waiting for a slow mail server) is answered, not cut off
    /// with an empty reply; a connection that then says nothing is still closed.
    #[tokio::test]
    async fn a_request_answered_slower_than_the_idle_limit_gets_its_answer() {
        let limits = Limits {
            max_connections: 10,
            per_client: 10,
            idle: Duration::from_millis(300),
            lifetime: None,
            head_within: HEAD_WITHIN,
        };
        let addr = answering_after(limits, Duration::from_millis(1_000)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = ask(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("answered"), "got {answer:?}");
        // Kept alive, then idle: closed after the idle limit.
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }

    /// A request being answered when its connection's lifetime ends (an IVR platform's
    /// kept-alive connection: its password set, the platform told nothing, and the
    /// call's retry answered `unknown_call`) gets its answer; the connection then
    /// closes, not taking another request.
    #[tokio::test]
    async fn a_request_being_answered_when_its_connection_s_lifetime_ends_gets_its_answer() {
        let limits = Limits {
            max_connections: 10,
            per_client: 10,
            idle: Duration::from_secs(5),
            lifetime: Some(Duration::from_millis(300)),
            head_within: HEAD_WITHIN,
        };
        let addr = answering_after(limits, Duration::from_millis(1_000)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = ask(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("answered"), "got {answer:?}");
        let next = ask(&mut stream).await;
        assert!(next.is_empty(), "a connection past its lifetime took another request: {next:?}");
    }

    /// A client that trickles a byte before each idle timeout is still closed at the
    /// connection's lifetime.
    #[tokio::test]
    async fn a_trickling_client_is_closed_at_the_lifetime() {
        let limits = Limits {
            max_connections: 10,
            per_client: 10,
            idle: Duration::from_millis(400),
            lifetime: Some(Duration::from_millis(1_000)),
            head_within: HEAD_WITHIN,
        };
        let (addr, _server) = guarded(limits).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // 40 bytes, one every 150 ms (6 s in all), each well within the idle time.
        let mut closed_after = None;
        for (sent, byte) in b"GET / HTTP/1.1\r\nHost: trickle\r\n".iter().cycle().take(40).enumerate() {
            let mut buf = [0u8; 1];
            let gone = stream.write_all(&[*byte]).await.is_err()
                || matches!(
                    tokio::time::timeout(Duration::from_millis(150), stream.read(&mut buf)).await,
                    Ok(Ok(0) | Err(_))
                );
            if gone {
                closed_after = Some(sent);
                break;
            }
        }
        let sent = closed_after.expect("the connection was closed while the client trickled");
        assert!(sent < 20, "closed at the 1 s lifetime, after {sent} bytes");
    }
}
