//! A pool of SMTP connections ([`Connection`], pipelining where the server offers it),
//! with `TCP_NODELAY` set, so nothing waits for the server's delayed ACK.
//!
//! Mails beyond `smtp.pool_size` wait in line. When a connection's mail has its message
//! sent, the envelope of the first mail waiting goes out in the same write (RFC 2920,
//! 3.1), and that mail is handed the connection with its envelope accepted: under load a
//! mail costs one write and one round trip. Without PIPELINING a waiting mail is simply
//! handed the connection.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::oneshot;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::client::{ClientError, Connection, Session, TlsStart, TlsTarget};
use super::DeliverError;
use crate::config::{SmtpSettings, TlsMode};
use crate::telemetry::Metrics;

/// An idle connection older than this is closed rather than reused: servers drop idle
/// clients after a while, and a failed first command would cost a retry.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Why a send failed; sorted by the caller into retry or give up.
#[derive(Debug)]
pub enum SendError {
    /// The server answered, or the connection or session failed.
    Client(ClientError),
    /// No answer within `smtp.timeout_secs` (after DATA the mail may have arrived).
    Timeout,
    Connect(std::io::Error),
    /// Not sent: by the time a connection was free, the mail was no longer this node's
    /// to send (its CDR partition went to another reader, which sends it).
    Passed,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("the mail server did not answer in time"),
            Self::Connect(e) => write!(f, "cannot connect to the mail server: {e}"),
            Self::Passed => f.write_str("not sent: its partition went to another reader"),
        }
    }
}

/// `Display` already includes what caused it, so there is no `source` for an
/// error-chain printer to repeat.
impl std::error::Error for SendError {}

pub struct SmtpPool {
    host: String,
    port: u16,
    tls: Option<(TlsStart, Arc<ClientConfig>)>,
    /// User and password for AUTH.
    credentials: Option<(String, String)>,
    timeout: Duration,
    /// The name given in EHLO: this host's name, or its address literal.
    hello: String,
    /// Connections in use (at most `smtp.pool_size`), idle ones, and the mails waiting
    /// for one; never locked across an await.
    slots: Arc<Mutex<Slots>>,
    /// Counts the sessions opened (the engine's pool; not the send-test button's).
    metrics: Option<Metrics>,
}

struct Slots {
    /// Connections that may still be put to use: `smtp.pool_size` minus those in use.
    free: usize,
    /// Idle connections and when they were last used.
    idle: Vec<(Connection, Instant)>,
    /// Mails waiting for a connection, first come first served.
    waiting: VecDeque<Waiter>,
}

/// A mail waiting for a connection. Whoever finishes with one next may send this
/// mail's envelope behind its own message and hand the connection over with the
/// envelope accepted: a mail then costs one write and one round trip.
struct Waiter {
    envelope: Envelope,
    eight_bit: bool,
    /// Whether its mail is asked, when its turn comes, if it is still this node's: then
    /// it is never sent behind another's message (its envelope would be out before).
    asks: bool,
    handoff: oneshot::Sender<Handoff>,
}

/// One connection of the pool's `smtp.pool_size` in use, and the connection itself once
/// open. Dropped, it closes that connection (in an unknown state after an error or a
/// cancelled send) and lets the next waiting mail open another; only
/// [`Lease::give_back`] keeps the connection.
struct Lease {
    slots: Arc<Mutex<Slots>>,
    conn: Option<Connection>,
    /// Whether dropping it releases its slot (not once given back or handed on).
    armed: bool,
}

/// What a waiting mail is handed.
struct Handoff {
    lease: Lease,
    state: Handed,
}

enum Handed {
    /// A connection to open (or an idle one, in the lease).
    Connection,
    /// The mail's envelope went out on the lease's connection and was accepted: the
    /// message is next.
    Accepted,
    /// The mail's envelope went out and the server refused it; the connection, if still
    /// usable, is in the lease for the next mail.
    Refused(ClientError),
}

impl Lease {
    /// Returns the slot, with the connection if it is still usable, to the pool or to
    /// the next mail (nothing if the slot was handed on already).
    fn give_back(mut self) {
        if std::mem::replace(&mut self.armed, false) {
            release(&self.slots, self.conn.take().filter(Connection::usable));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn = None;
        if self.armed {
            release(&self.slots, None);
        }
    }
}

/// Hands a slot (with `conn`, if given) to the first mail still waiting, or puts it back.
fn release(slots: &Arc<Mutex<Slots>>, mut conn: Option<Connection>) {
    loop {
        let waiter = {
            let mut slots = slots.lock().expect("slots lock");
            match slots.waiting.pop_front() {
                Some(waiter) => waiter,
                None => {
                    slots.free += 1;
                    if let Some(conn) = conn {
                        slots.idle.push((conn, Instant::now()));
                    }
                    return;
                }
            }
        };
        let lease = Lease { slots: slots.clone(), conn: conn.take(), armed: true };
        match waiter.handoff.send(Handoff { lease, state: Handed::Connection }) {
            Ok(()) => return,
            // That mail is no longer waiting: the next one gets the slot.
            Err(Handoff { mut lease, .. }) => {
                lease.armed = false;
                conn = lease.conn.take();
            }
        }
    }
}

/// Whether the transaction ended in step with the server: its mail accepted or refused.
/// Any other failure leaves the connection to be closed; after these, the connection
/// itself says whether it is still usable ([`Connection::usable`]).
fn in_step(outcome: &Result<(), SendError>) -> bool {
    match outcome {
        Ok(()) => true,
        Err(SendError::Client(e)) => e.refused_in_step(),
        Err(_) => false,
    }
}

impl SmtpPool {
    /// Fails only on an unreadable `smtp.tls_ca_file`.
    pub fn new(s: &SmtpSettings, metrics: Option<Metrics>) -> Result<Self, DeliverError> {
        let start = match s.tls {
            TlsMode::None => None,
            TlsMode::Starttls => Some(TlsStart::Starttls),
            TlsMode::Tls => Some(TlsStart::Implicit),
        };
        let tls = match start {
            Some(start) => {
                let roots = match &s.tls_ca_file {
                    Some(path) => private_roots(path)?,
                    None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
                };
                Some((start, Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())))
            }
            None => None,
        };
        let slots = Slots { free: s.pool_size as usize, idle: Vec::new(), waiting: VecDeque::new() };
        Ok(Self {
            host: s.host.clone(),
            port: s.port,
            tls,
            credentials: (!s.username.is_empty()).then(|| (s.username.clone(), s.password.expose().to_owned())),
            timeout: Duration::from_secs(s.timeout_secs.max(1)),
            hello: ClientId::default().to_string(),
            slots: Arc::new(Mutex::new(slots)),
            metrics,
        })
    }

    /// Sends one message on a pooled connection, if `ours` (when given) still holds once
    /// one is free (a queued mail's partition may move to another reader while it waits,
    /// and that one sends it). A connection that failed is dropped, not returned to the
    /// pool.
    pub async fn send(&self, envelope: &Envelope, message: &[u8], ours: Option<&Ours<'_>>) -> Result<(), SendError> {
        let (mut lease, accepted) = loop {
            let Handoff { lease, state } = match self.acquire(envelope, message, ours.is_some()) {
                Ok(handoff) => handoff,
                Err(handed) => match handed.await {
                    Ok(handoff) => handoff,
                    // Whoever sent this mail's envelope ahead failed or was cancelled
                    // before the server accepted it: nothing went out; queue again.
                    Err(_) => continue,
                },
            };
            match state {
                Handed::Connection if ours.is_some_and(|ours| !ours()) => {
                    lease.give_back();
                    return Err(SendError::Passed);
                }
                Handed::Connection => break (lease, false),
                Handed::Accepted => break (lease, true),
                Handed::Refused(e) => {
                    let refused = Err(SendError::Client(e));
                    if in_step(&refused) {
                        lease.give_back();
                    }
                    return refused;
                }
            }
        };
        let fresh = lease.conn.is_none();
        if fresh {
            lease.conn = Some(self.connect().await?);
        }
        let result = match self.transact(&mut lease, envelope, message, accepted).await {
            // A pooled connection the server closed meanwhile fails before any reply: try
            // once more at once on a new connection rather than after a retry delay.
            Err(SendError::Client(ClientError::Closed { answered: false, .. })) if !fresh && !accepted => {
                lease.conn = Some(self.connect().await?);
                self.transact(&mut lease, envelope, message, false).await
            }
            other => other,
        };
        if in_step(&result) {
            lease.give_back();
        }
        result
    }

    /// A connection for this mail at once (idle, or one to open), or a place in the
    /// queue of mails waiting for one.
    fn acquire(&self, envelope: &Envelope, message: &[u8], asks: bool) -> Result<Handoff, oneshot::Receiver<Handoff>> {
        let mut slots = self.slots.lock().expect("slots lock");
        if slots.free == 0 {
            let (handoff, handed) = oneshot::channel();
            let waiter = Waiter { envelope: envelope.clone(), eight_bit: !message.is_ascii(), asks, handoff };
            slots.waiting.push_back(waiter);
            return Err(handed);
        }
        slots.free -= 1;
        // One the server spoke on since (a 421 as it timed it out, its end) is done with.
        slots.idle.retain(|(conn, used)| used.elapsed() < MAX_IDLE && conn.quiet());
        let conn = slots.idle.pop().map(|(conn, _)| conn);
        Ok(Handoff { lease: Lease { slots: self.slots.clone(), conn, armed: true }, state: Handed::Connection })
    }

    /// Sends the mail on the lease's connection (its envelope already accepted if
    /// `accepted`). The envelope of the first mail waiting goes out with the message,
    /// and that mail is handed the connection once the server has answered both.
    async fn transact(
        &self,
        lease: &mut Lease,
        envelope: &Envelope,
        message: &[u8],
        accepted: bool,
    ) -> Result<(), SendError> {
        let conn = lease.conn.as_mut().expect("a leased connection is open");
        if !accepted {
            self.within(conn.envelope(envelope, !message.is_ascii())).await?;
        }
        conn.push_message(message);
        let next = self.next_waiter(conn);
        self.within(conn.flush_output()).await?;
        let sent = self.within(conn.message_reply()).await;
        // A refused message ends its transaction in step with the server: the next
        // mail's envelope is answered all the same.
        if matches!(sent, Err(ref e) if !matches!(e, SendError::Client(refused) if refused.refused_in_step())) {
            return sent;
        }
        if let Some(next) = next {
            // This mail is answered, and returns now; the connection and the slot go to
            // the next one, whose envelope's replies are read on a task of their own.
            // Read here, a mail the server had accepted waited for them (up to the step
            // timeout), and a stop or the breaker opening meanwhile dropped it as
            // unanswered, to be sent again.
            let conn = lease.conn.take().expect("a leased connection is open");
            lease.armed = false;
            let handing = Lease { slots: self.slots.clone(), conn: Some(conn), armed: true };
            tokio::spawn(hand_on(handing, next, self.timeout));
        }
        sent
    }

    /// The first mail still waiting, its envelope pushed behind the message being sent;
    /// none without PIPELINING or if its addresses cannot go to this server.
    fn next_waiter(&self, conn: &mut Connection) -> Option<Waiter> {
        if !conn.pipelining() {
            return None;
        }
        let mut slots = self.slots.lock().expect("slots lock");
        while let Some(waiter) = slots.waiting.pop_front() {
            if waiter.handoff.is_closed() {
                continue;
            }
            if !waiter.asks && conn.push_envelope(&waiter.envelope, waiter.eight_bit).is_ok() {
                return Some(waiter);
            }
            // It will find out itself, on the connection it is handed next (or be asked
            // then if it is still this node's).
            slots.waiting.push_front(waiter);
            return None;
        }
        None
    }

    /// Bounds `step` by `smtp.timeout_secs`.
    async fn within(&self, step: impl std::future::Future<Output = Result<(), ClientError>>) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, step).await {
            Ok(result) => result.map_err(SendError::Client),
            Err(_) => Err(SendError::Timeout),
        }
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let within = |f| tokio::time::timeout(self.timeout, f);
        let tcp = within(tokio::net::TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        let tls = match &self.tls {
            Some((start, config)) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| SendError::Client(ClientError::Tls(e.to_string())))?;
                Some((*start, TlsTarget { config, name }))
            }
            None => None,
        };
        let credentials = self.credentials.as_ref().map(|(user, password)| (user.as_str(), password.as_str()));
        let session = Session { tls, hello: &self.hello, credentials };
        let conn = tokio::time::timeout(self.timeout, Connection::open(tcp, &session))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Client)?;
        if let Some(metrics) = &self.metrics {
            metrics.smtp_connection_opened();
        }
        Ok(conn)
    }
}

/// Whether a mail is still this node's to send, asked when it is about to go out.
pub type Ours<'a> = dyn Fn() -> bool + Sync + 'a;

/// Reads the replies to `next`'s envelope, sent behind the message before it on
/// `lease`'s connection, and hands `next` the connection, whatever its envelope's fate.
/// Dropped (the slot released, the connection closed), `lease` leaves `next` to queue
/// again: its sender is dropped with it.
async fn hand_on(mut lease: Lease, next: Waiter, timeout: Duration) {
    let conn = lease.conn.as_mut().expect("a leased connection is open");
    let handed = match tokio::time::timeout(timeout, conn.envelope_replies(&next.envelope)).await {
        Ok(Ok(())) => Handed::Accepted,
        Ok(Err(refused)) if refused.refused_in_step() => Handed::Refused(refused),
        // Nothing of that mail was accepted, and this connection, out of step, closes.
        _ => return,
    };
    // The slot and the connection go with the handoff (and on to the next mail should
    // that one have stopped waiting).
    let conn = lease.conn.take().filter(Connection::usable);
    if conn.is_none() && matches!(handed, Handed::Accepted) {
        // Its envelope was taken on a connection no longer usable (a 421 to the message
        // before, and a server answering on all the same): it goes with the connection,
        // and that mail starts over. Handed on, it went as a message on a new connection
        // without one.
        return;
    }
    lease.armed = false;
    let handoff = Handoff { lease: Lease { slots: lease.slots.clone(), conn, armed: true }, state: handed };
    let _ = next.handoff.send(handoff);
}

/// The CA certificates in the PEM file at `path` (read once, at start).
pub(super) fn private_roots(path: &Path) -> Result<RootCertStore, DeliverError> {
    let failed = |reason: String| DeliverError::TlsCa { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| failed(e.to_string()))?).map_err(|e| failed(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(failed("no CERTIFICATE block in the file".into()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::smtp::SmtpSink;

    fn pool_for(port: u16) -> SmtpPool {
        SmtpPool::new(&crate::deliver::tests::smtp_to(port), None).unwrap()
    }

    fn envelope() -> Envelope {
        Envelope::new(Some("no-reply@example.jp".parse().unwrap()), vec!["taro@example.jp".parse().unwrap()]).unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_and_one_the_server_dropped_is_replaced_at_once() {
        let sink = SmtpSink::start(0).await.unwrap();
        let port = sink.port();
        let pool = pool_for(port);
        pool.send(&envelope(), b"Subject: 1\r\n\r\none", None).await.unwrap();
        pool.send(&envelope(), b"Subject: 2\r\n\r\ntwo", None).await.unwrap();
        assert_eq!(pool.slots.lock().unwrap().idle.len(), 1, "one connection served both mails");

        // The server goes away and comes back: the pooled connection is dead.
        sink.shutdown().await;
        let sink = SmtpSink::start(port).await.unwrap();
        pool.send(&envelope(), b"Subject: 3\r\n\r\nthree", None)
            .await
            .expect("sent on a new connection, no retry needed");
        assert_eq!(sink.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    }

    /// R-M4: a pooled connection the server timed out meanwhile (postfix's `smtpd_timeout`:
    /// 421, then it closes) answers the next mail's first command with that 421: the
    /// mail goes at once on a new connection, as on one closed silently, not after a
    /// retry delay (nearly every mail after a pause, on a relay under stress).
    #[tokio::test]
    async fn a_pooled_connection_the_server_timed_out_is_replaced_at_once() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        for pipelining in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (time_out, timed_out) = (tokio::sync::oneshot::channel::<()>(), tokio::sync::oneshot::channel::<()>());
            let server = tokio::spawn(async move {
                let (mut time_out, mut timed_out) = (Some(time_out.1), Some(timed_out.0));
                let mut messages = Vec::new();
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    let mut rd = BufReader::new(socket);
                    rd.get_mut().write_all(b"220 scripted ESMTP\r\n").await.unwrap();
                    let mut line = String::new();
                    while {
                        line.clear();
                        rd.read_line(&mut line).await.unwrap_or(0) > 0
                    } {
                        let reply: &[u8] = match &line[..4] {
                            "EHLO" if pipelining => b"250-scripted\r\n250 PIPELINING\r\n",
                            "EHLO" => b"250 scripted\r\n",
                            "DATA" => {
                                rd.get_mut().write_all(b"354 go ahead\r\n").await.unwrap();
                                let mut message = String::new();
                                while !message.ends_with("\r\n.\r\n") {
                                    rd.read_line(&mut message).await.unwrap();
                                }
                                messages.push(message);
                                b"250 2.0.0 queued\r\n"
                            }
                            "QUIT" => break,
                            _ => b"250 ok\r\n",
                        };
                        rd.get_mut().write_all(reply).await.unwrap();
                        // Idle past its limit once the first mail is in: 421, and it closes.
                        if line.starts_with("DATA") {
                            if let (Some(time_out), Some(timed_out)) = (time_out.take(), timed_out.take()) {
                                time_out.await.unwrap();
                                rd.get_mut().write_all(b"421 4.4.2 Error: timeout exceeded\r\n").await.unwrap();
                                rd.get_mut().shutdown().await.unwrap();
                                timed_out.send(()).unwrap();
                                break;
                            }
                        }
                    }
                    if messages.len() == 2 {
                        return messages;
                    }
                }
            });
            let metrics = Metrics::new();
            let pool = one_connection(port, &metrics);
            pool.send(&envelope(), b"Subject: 1\r\n\none", None).await.unwrap();
            time_out.0.send(()).unwrap();
            timed_out.1.await.unwrap();
            let sent = together(pool.send(&envelope(), b"Subject: 2\r\n\ntwo", None)).await;
            assert!(sent.is_ok(), "pipelining {pipelining}: {sent:?}");
            assert_eq!(opened(&metrics), 2.0);
            drop(pool);
            let messages = together(server).await.unwrap();
            assert!(messages[1].starts_with("Subject: 2"), "{messages:?}");
        }
    }

    /// A pool of one connection, counting the sessions it opens in `metrics`.
    fn one_connection(port: u16, metrics: &Metrics) -> SmtpPool {
        let mut settings = crate::deliver::tests::smtp_to(port);
        settings.pool_size = 1;
        SmtpPool::new(&settings, Some(metrics.clone())).unwrap()
    }

    fn opened(metrics: &Metrics) -> f64 {
        metrics.value(crate::telemetry::SMTP_CONNECTIONS).expect("shown from the start")
    }

    fn to(address: &str) -> Envelope {
        Envelope::new(Some("no-reply@example.jp".parse().unwrap()), vec![address.parse().unwrap()]).unwrap()
    }

    /// Runs `sends` together on this task (the first to ask gets the connection); a
    /// pool that hangs fails the test.
    async fn together<T>(sends: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), sends).await.expect("the pool hung")
    }

    /// With PIPELINING, a mail waiting for the connection has its envelope sent behind
    /// the message before it: one write and one round trip a mail, not two.
    #[tokio::test]
    async fn a_waiting_mail_s_envelope_goes_out_with_the_message_before_it() {
        use crate::deliver::client::tests::server_for;
        let (port, server) = server_for(&["PIPELINING"], 1).await;
        let metrics = Metrics::new();
        let pool = one_connection(port, &metrics);
        let (a, b, c) = (to("a@example.jp"), to("b@example.jp"), to("c@example.jp"));
        let sent = together(async {
            tokio::join!(
                pool.send(&a, b"Subject: 1\r\n\none", None),
                pool.send(&b, b"Subject: 2\r\n\ntwo", None),
                pool.send(&c, b"Subject: 3\r\n\nthree", None),
            )
        })
        .await;
        assert!(sent.0.is_ok() && sent.1.is_ok() && sent.2.is_ok(), "{sent:?}");
        assert_eq!(opened(&metrics), 1.0, "one session for the three mails");
        drop(pool);
        let seen = server.await.unwrap();
        let after = |message: &str| &seen[seen.iter().position(|l| l.contains(message)).unwrap() + 1..];
        assert_eq!(after("one")[..2], ["(more in the same write)", "MAIL FROM:<no-reply@example.jp>"], "{seen:?}");
        assert_eq!(after("one")[2], "RCPT TO:<b@example.jp>");
        assert_eq!(
            after("two")[..3],
            ["(more in the same write)", "MAIL FROM:<no-reply@example.jp>", "RCPT TO:<c@example.jp>"]
        );
        assert!(after("three").is_empty(), "nothing was waiting behind the last: {seen:?}");
    }

    /// R-M4: a mail the server accepted is answered at once, though the envelope of the mail
    /// behind it, sent with its message, is not answered yet: it waited for those
    /// replies (up to `smtp.timeout_secs`), and a stop or the breaker opening meanwhile
    /// dropped it as unanswered, to be sent again.
    #[tokio::test]
    async fn a_mail_accepted_is_answered_without_waiting_for_the_next_one_s_envelope() {
        use crate::deliver::client::tests::server_for;
        let (port, _server) = server_for(&["PIPELINING"], 1).await;
        let mut settings = crate::deliver::tests::smtp_to(port);
        (settings.pool_size, settings.timeout_secs) = (1, 600);
        let pool = SmtpPool::new(&settings, None).unwrap();
        let (a, slow) = (to("a@example.jp"), to("slow@example.jp"));
        let sent = together(async {
            let behind = pool.send(&slow, b"Subject: 2\r\n\ntwo", None);
            tokio::pin!(behind);
            tokio::select! {
                biased;
                sent = pool.send(&a, b"Subject: 1\r\n\none", None) => sent,
                _ = &mut behind => panic!("the mail behind was answered first"),
            }
        })
        .await;
        assert!(sent.is_ok(), "{sent:?}");
    }

    /// R-M4: a mail that waited for a connection goes out only if it is still this node's
    /// when one is free: a queued mail's CDR partition that moved to another reader
    /// meanwhile (a rebalance while the relay was slow) is that reader's to send, and
    /// sending it here too made it twice.
    #[tokio::test]
    async fn a_mail_no_longer_this_node_s_when_a_connection_is_free_is_not_sent() {
        use crate::deliver::client::tests::server_for;
        // With PIPELINING, a waiting mail's envelope went out behind the message before
        // it, unasked.
        for extensions in [&[][..], &["PIPELINING"]] {
            let extensions: &'static [&'static str] = if extensions.is_empty() { &[] } else { &["PIPELINING"] };
            let (port, server) = server_for(extensions, 1).await;
            let metrics = Metrics::new();
            let pool = one_connection(port, &metrics);
            let ours = std::sync::atomic::AtomicBool::new(true);
            let still_ours = || ours.load(std::sync::atomic::Ordering::SeqCst);
            let (a, b) = (to("a@example.jp"), to("b@example.jp"));
            let sent = together(async {
                tokio::join!(
                    async {
                        let sent = pool.send(&a, b"Subject: 1\r\n\none", None).await;
                        // While the second mail waited for this connection, its partition moved.
                        ours.store(false, std::sync::atomic::Ordering::SeqCst);
                        sent
                    },
                    pool.send(&b, b"Subject: 2\r\n\ntwo", Some(&still_ours)),
                )
            })
            .await;
            assert!(sent.0.is_ok(), "{extensions:?}: {sent:?}");
            assert!(matches!(sent.1, Err(SendError::Passed)), "{extensions:?}: {sent:?}");
            drop(pool);
            let seen = server.await.unwrap();
            assert!(!seen.iter().any(|l| l.contains("b@example.jp")), "{extensions:?}: {seen:?}");
        }
    }

    /// A mail whose envelope went out behind another's message fails or succeeds on its
    /// own: a refused recipient fails only its mail, a refused message only its own, and
    /// the mails after them are sent on the same connection.
    #[tokio::test]
    async fn mails_sent_behind_one_another_are_answered_each_on_its_own() {
        use crate::deliver::client::tests::server_for;
        let (port, server) = server_for(&["PIPELINING"], 1).await;
        let metrics = Metrics::new();
        let pool = one_connection(port, &metrics);
        let (a, b) = (to("a@example.jp"), to("refused@example.jp"));
        let (c, d) = (to("c@example.jp"), to("d@example.jp"));
        let results = together(async {
            tokio::join!(
                pool.send(&a, b"Subject: 1\r\n\none", None),
                pool.send(&b, b"Subject: 2\r\n\ntwo", None),
                pool.send(&c, b"Subject: 3\r\n\nREJECT ME", None),
                pool.send(&d, b"Subject: 4\r\n\nfour", None),
            )
        })
        .await;
        let refused = |r: &Result<(), SendError>, code| matches!(r, Err(SendError::Client(ClientError::Refused(reply))) if reply.code == code);
        assert!(results.0.is_ok(), "{results:?}");
        assert!(refused(&results.1, 550), "{results:?}");
        assert!(refused(&results.2, 554), "{results:?}");
        assert!(results.3.is_ok(), "{results:?}");
        assert_eq!(opened(&metrics), 1.0, "refusals do not cost a new session");
        drop(pool);
        let seen = server.await.unwrap();
        let messages: Vec<_> = seen.iter().filter(|l| l.starts_with("Subject")).collect();
        assert_eq!(messages.len(), 3, "the refused recipient's message was never sent: {seen:?}");
        assert_eq!(seen.iter().filter(|l| *l == "(connection)").count(), 1, "{seen:?}");
        // The refused envelope's MAIL was accepted: RSET clears it before the next one.
        let rset = seen.iter().position(|l| l == "RSET").expect("an RSET after the refused recipient");
        assert_eq!(seen[rset - 2..rset], ["RCPT TO:<refused@example.jp>", "DATA"], "{seen:?}");
        assert_eq!(seen[rset + 2], "RCPT TO:<c@example.jp>", "{seen:?}");
        assert_eq!(seen.iter().filter(|l| *l == "RSET").count(), 1, "none after a refused message: {seen:?}");
    }

    /// With or without PIPELINING, a refusal leaves the connection in step with the
    /// server: the next mail goes out on it, after an RSET where the refused transaction
    /// may still hold its MAIL, and is sent.
    #[tokio::test]
    async fn after_a_refusal_the_next_mail_goes_out_on_the_same_connection() {
        use crate::deliver::client::tests::server_for;
        let no_extensions: &'static [&'static str] = &[];
        for extensions in [&["PIPELINING"][..], no_extensions] {
            let (port, server) = server_for(extensions, 1).await;
            let metrics = Metrics::new();
            let pool = one_connection(port, &metrics);
            let refused = |r: Result<(), SendError>| match r {
                Err(SendError::Client(ClientError::Refused(reply))) => reply.code,
                other => panic!("not refused: {other:?}"),
            };
            let first = together(pool.send(&to("refused@example.jp"), b"Subject: 1\r\n\r\none", None)).await;
            assert_eq!(refused(first), 550);
            let second = together(pool.send(&to("c@example.jp"), b"Subject: 2\r\n\r\nREJECT ME", None)).await;
            assert_eq!(refused(second), 554);
            together(pool.send(&to("d@example.jp"), b"Subject: 3\r\n\r\nthree", None))
                .await
                .expect("sent after two refusals");
            assert_eq!(opened(&metrics), 1.0, "{extensions:?}: refusals do not cost a new session");
            drop(pool);
            let seen = server.await.unwrap();
            assert_eq!(seen.iter().filter(|l| *l == "(connection)").count(), 1, "{extensions:?}: {seen:?}");
            let rset = seen.iter().position(|l| l == "RSET").expect("an RSET after the refused recipient");
            assert_eq!(seen[rset + 2], "RCPT TO:<c@example.jp>", "{extensions:?}: {seen:?}");
            assert_eq!(seen.iter().filter(|l| *l == "RSET").count(), 1, "{extensions:?}: {seen:?}");
            assert!(seen.last().unwrap().contains("three"), "{extensions:?}: {seen:?}");
        }
    }

    /// A server that hangs up after refusing (421, closing; or 550, then gone) has the
    /// mail refused with its reply, not failed as a dropped connection (R-M4: a 5xx is
    /// given up, not retried), and the next mail goes out on a new connection.
    #[tokio::test]
    async fn a_refusal_the_server_hangs_up_after_is_the_mail_s_answer_and_the_next_mail_reconnects() {
        use crate::deliver::client::tests::server_for;
        for (address, code) in [("closing@example.jp", 421), ("refused-then-gone@example.jp", 550)] {
            let (port, server) = server_for(&["PIPELINING"], 2).await;
            let metrics = Metrics::new();
            let pool = one_connection(port, &metrics);
            let refused = together(pool.send(&to(address), b"Subject: 1\r\n\r\none", None)).await;
            assert!(
                matches!(refused, Err(SendError::Client(ClientError::Refused(ref r))) if r.code == code),
                "{address}: {refused:?}"
            );
            assert!(pool.slots.lock().unwrap().idle.is_empty(), "{address}: the closed connection is not pooled");
            together(pool.send(&to("d@example.jp"), b"Subject: 2\r\n\r\ntwo", None))
                .await
                .expect("sent on a new connection");
            assert_eq!(opened(&metrics), 2.0, "{address}");
            drop(pool);
            let seen = server.await.unwrap();
            assert_eq!(seen.iter().filter(|l| *l == "(connection)").count(), 2, "{address}: {seen:?}");
            assert!(seen.last().unwrap().contains("two"), "{address}: {seen:?}");
        }
    }

    #[tokio::test]
    async fn a_relay_with_a_private_ca_is_trusted_through_smtp_tls_ca_file() {
        use crate::deliver::client::tests::{acceptor, fixture, server_with};
        let ca_file = fixture("ca.crt");
        let (port, server) = server_with(&["PIPELINING"], false, Some((TlsStart::Starttls, acceptor()))).await;
        let mut settings = crate::deliver::tests::smtp_to(port);
        (settings.host, settings.tls, settings.tls_ca_file) = ("localhost".into(), TlsMode::Starttls, Some(ca_file));

        let pool = SmtpPool::new(&settings, None).unwrap();
        pool.send(&envelope(), b"Subject: 1\r\n\r\nprivate CA", None).await.expect("sent over TLS");
        drop(pool);
        let seen = server.await.unwrap();
        assert!(seen.contains(&"(TLS)".to_owned()) && seen.last().unwrap().contains("private CA"), "{seen:?}");

        // Without the file the public roots do not know the relay's CA.
        settings.tls_ca_file = None;
        let (port, _server) = server_with(&["PIPELINING"], false, Some((TlsStart::Starttls, acceptor()))).await;
        settings.port = port;
        let refused = SmtpPool::new(&settings, None).unwrap().send(&envelope(), b"x", None).await.unwrap_err();
        assert!(refused.to_string().contains("TLS"), "{refused}");
    }

    #[test]
    fn an_unusable_tls_ca_file_stops_the_start_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let mut settings = crate::deliver::tests::smtp_to(25);
        settings.tls = TlsMode::Starttls;
        for path in [not_pem, dir.path().join("missing.pem")] {
            settings.tls_ca_file = Some(path.clone());
            let Err(e) = SmtpPool::new(&settings, None) else { panic!("{} accepted", path.display()) };
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
    }
}
