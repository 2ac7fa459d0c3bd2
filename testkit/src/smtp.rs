//! A small SMTP server (RFC 5321 subset) that receives the mails the engine sends.
//!
//! It speaks real SMTP over TCP, PIPELINING included, so that the production delivery
//! path (the engine's pooled client) is exercised unchanged by the tests and the load
//! tester. Faults can be scripted per stage to test
//! retry and bounce handling.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// RFC 5321 allows 512 octets per command line; we are lenient up to 1000.
const MAX_COMMAND_LINE: usize = 1000;
/// Advertised via SIZE; bounds the memory one message can take.
const MAX_MESSAGE: usize = 50 * 1024 * 1024;

/// The environment (docs/configuration.md) that points an engine's mail client at a
/// server on `addr`.
pub fn engine_env(addr: SocketAddr) -> [(&'static str, String); 2] {
    [("CALLNOTIFY__SMTP__HOST", addr.ip().to_string()), ("CALLNOTIFY__SMTP__PORT", addr.port().to_string())]
}

/// One mail accepted by the sink.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as received, dot-unstuffed, without the final CRLF.CRLF.
    pub data: Vec<u8>,
    pub received_at: SystemTime,
}

/// The transaction stage whose reply [`SmtpSink::fail_next`] overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpStage {
    MailFrom,
    RcptTo,
    DataEnd,
}

/// What the sink does instead of answering the end of DATA ([`SmtpSink::after_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFault {
    /// Never answers; the client times out not knowing whether the mail arrived.
    Hang,
    /// Closes the connection without an answer.
    Drop,
}

/// Options for [`SmtpSink::start_with`].
#[derive(Debug, Clone, Copy)]
pub struct SinkOptions {
    /// 0 picks any free port.
    pub port: u16,
    /// A load tester sets this to false so memory stays flat; then only
    /// [`SmtpSink::count`] and [`SmtpSink::subscribe`] report mails.
    pub keep_mails: bool,
}

/// State shared by the handle and all connection tasks.
struct Shared {
    keep_mails: bool,
    mails: Mutex<Vec<ReceivedMail>>,
    count: AtomicUsize,
    accepted: Notify,
    /// Per stage: (reply code, how many more times).
    faults: Mutex<[Option<(u16, usize)>; 3]>,
    /// RCPT TO addresses answered with a code until cleared.
    refused: Mutex<std::collections::HashMap<String, u16>>,
    /// The next `usize` ends of DATA get this instead of an answer; the mail is not kept.
    after_data: Mutex<Option<(DataFault, usize)>>,
    events: broadcast::Sender<ReceivedMail>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not cascade into every later caller.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn take_fault(&self, stage: SmtpStage) -> Option<String> {
        let mut faults = lock(&self.faults);
        let slot = &mut faults[stage as usize];
        let (code, left) = slot.as_mut()?;
        let code = *code;
        *left -= 1;
        if *left == 0 {
            *slot = None;
        }
        Some(format!("{code} scripted failure ({stage:?})"))
    }

    fn take_data_fault(&self) -> Option<DataFault> {
        let mut slot = lock(&self.after_data);
        let (fault, left) = slot.as_mut()?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            *slot = None;
        }
        Some(fault)
    }

    fn record(&self, mail: ReceivedMail) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(mail.clone());
        }
        if self.keep_mails {
            lock(&self.mails).push(mail);
        }
        // Counted after the push so that wait_for sees the mail once count is reached.
        self.count.fetch_add(1, Ordering::SeqCst);
        self.accepted.notify_waiters();
    }
}

/// A running SMTP sink on 127.0.0.1. Dropping it stops the server, like `shutdown`.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping the sender tells the accept loop to stop.
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    /// Binds 127.0.0.1:port (0 = any free port) and serves until dropped or shut down.
    pub async fn start(port: u16) -> io::Result<SmtpSink> {
        Self::start_with(SinkOptions { port, keep_mails: true }).await
    }

    pub async fn start_with(opts: SinkOptions) -> io::Result<SmtpSink> {
        let listener = TcpListener::bind(("127.0.0.1", opts.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            keep_mails: opts.keep_mails,
            mails: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            accepted: Notify::new(),
            faults: Mutex::new([None; 3]),
            refused: Mutex::default(),
            after_data: Mutex::default(),
            events: broadcast::channel(4096).0,
        });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        Ok(SmtpSink { addr, shared, stop, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The environment that points an engine's mail client at this server.
    pub fn engine_env(&self) -> [(&'static str, String); 2] {
        engine_env(self.addr)
    }

    /// All mails accepted so far, in acceptance order (empty if `keep_mails` is off).
    pub fn mails(&self) -> Vec<ReceivedMail> {
        lock(&self.shared.mails).clone()
    }

    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Waits until at least n mails have been accepted or the timeout passes; returns the mails so far.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.accepted.notified();
            tokio::pin!(notified);
            // Register before checking so a mail recorded in between is not missed.
            notified.as_mut().enable();
            if self.count() >= n {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.mails()
    }

    /// Scripted replies for fault tests: the next `times` MAIL FROM / RCPT / DATA-end answer
    /// `code text` instead of 250. Meant for 4xx/5xx codes; replaces any earlier script for
    /// the stage, `times == 0` clears it.
    pub fn fail_next(&self, stage: SmtpStage, code: u16, times: usize) {
        lock(&self.shared.faults)[stage as usize] = (times > 0).then_some((code, times));
    }

    /// The next `times` ends of DATA are not answered: the connection hangs or is
    /// dropped, and the mail is not kept. `times == 0` clears it.
    pub fn after_data(&self, fault: DataFault, times: usize) {
        *lock(&self.shared.after_data) = (times > 0).then_some((fault, times));
    }

    /// How many of the ends of DATA scripted by [`SmtpSink::after_data`] are still to come.
    pub fn data_faults_left(&self) -> usize {
        lock(&self.shared.after_data).as_ref().map_or(0, |(_, left)| *left)
    }

    /// Scripted replies for one address: every RCPT TO `address` answers `code` (a 4xx
    /// or 5xx) until called again with `None`. Other recipients are not affected.
    pub fn refuse_recipient(&self, address: &str, code: Option<u16>) {
        let mut refused = lock(&self.shared.refused);
        match code {
            Some(code) => refused.insert(address.to_owned(), code),
            None => refused.remove(address),
        };
    }

    /// Per-mail notifications without cloning the whole list; slow receivers see `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<ReceivedMail> {
        self.shared.events.subscribe()
    }

    /// Stops accepting, closes all connections and waits until that is done.
    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    conns.spawn(async move {
                        if let Err(e) = serve(stream, &shared).await {
                            tracing::debug!(%peer, error = %e, "smtp sink connection ended");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "smtp sink accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Per-connection SMTP state; `tx` is the open transaction (MAIL FROM, recipients).
#[derive(Default)]
struct Session {
    greeted: bool,
    tx: Option<(String, Vec<String>)>,
}

enum Next {
    Reply(String),
    Data,
    Quit,
}

/// Serves one connection. Replies are buffered while pipelined commands are still
/// waiting to be read, and written together once there are none (RFC 2920, as postfix
/// does): a reply of its own per command would, with Nagle's algorithm, wait for the
/// client's delayed ACK.
async fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = tokio::io::BufWriter::new(wr);
    let mut line = Vec::new();
    let mut s = Session::default();
    wr.write_all(b"220 callnotify-sink ESMTP\r\n").await?;
    wr.flush().await?;
    loop {
        let next = match read_line(&mut rd, &mut line, MAX_COMMAND_LINE).await? {
            Line::Eof => return Ok(()),
            Line::TooLong => Next::Reply("500 5.5.2 line too long".into()),
            Line::Complete => match std::str::from_utf8(trim_eol(&line)) {
                Ok(cmd) => command(shared, &mut s, cmd),
                Err(_) => Next::Reply("500 5.5.2 invalid UTF-8".into()),
            },
        };
        let reply = match next {
            Next::Reply(r) => r,
            Next::Quit => {
                wr.write_all(b"221 2.0.0 bye\r\n").await?;
                return wr.flush().await;
            }
            Next::Data => {
                wr.write_all(b"354 end data with <CRLF>.<CRLF>\r\n").await?;
                wr.flush().await?;
                let Some(data) = read_data(&mut rd, &mut line).await? else {
                    return Ok(());
                };
                let (mail_from, rcpt_to) = s.tx.take().unwrap_or_default();
                match shared.take_data_fault() {
                    Some(DataFault::Drop) => return Ok(()),
                    // Until the client gives up and closes the connection.
                    Some(DataFault::Hang) => {
                        while rd.read_u8().await.is_ok() {}
                        return Ok(());
                    }
                    None => {}
                }
                if let Some(r) = shared.take_fault(SmtpStage::DataEnd) {
                    r
                } else {
                    // Recorded only after the 250 is written, so the count never includes a
                    // mail whose client got no final reply (delivery tests rely on that).
                    wr.write_all(b"250 2.0.0 accepted\r\n").await?;
                    wr.flush().await?;
                    let received_at = SystemTime::now();
                    shared.record(ReceivedMail { mail_from, rcpt_to, data, received_at });
                    continue;
                }
            }
        };
        wr.write_all(reply.as_bytes()).await?;
        wr.write_all(b"\r\n").await?;
        if rd.buffer().is_empty() {
            wr.flush().await?;
        }
    }
}

/// Handles one command line (without CRLF); DATA content and QUIT are left to the caller.
fn command(shared: &Shared, s: &mut Session, line: &str) -> Next {
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let verb = verb.to_ascii_uppercase();
    let reply = match (verb.as_str(), &mut s.tx) {
        ("EHLO" | "HELO", _) if arg.trim().is_empty() => "501 5.5.4 domain required".into(),
        ("EHLO" | "HELO", _) => {
            (s.greeted, s.tx) = (true, None);
            if verb == "HELO" {
                "250 callnotify-sink".into()
            } else {
                format!(
                    "250-callnotify-sink greets {}\r\n250-SIZE {MAX_MESSAGE}\r\n\
                     250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING",
                    arg.trim()
                )
            }
        }
        ("MAIL", _) if !s.greeted => "503 5.5.1 send EHLO first".into(),
        ("MAIL", Some(_)) => "503 5.5.1 nested MAIL command".into(),
        // Parameters (SIZE=, BODY=, SMTPUTF8) are accepted and ignored.
        ("MAIL", None) => match parse_path(arg, "FROM:") {
            None => "501 5.5.4 syntax: MAIL FROM:<address>".into(),
            Some(from) => shared.take_fault(SmtpStage::MailFrom).unwrap_or_else(|| {
                s.tx = Some((from.to_string(), Vec::new()));
                "250 2.1.0 ok".into()
            }),
        },
        ("RCPT" | "DATA", None) => "503 5.5.1 need MAIL first".into(),
        ("RCPT", Some((_, rcpts))) => match parse_path(arg, "TO:") {
            None | Some("") => "501 5.5.4 syntax: RCPT TO:<address>".into(),
            Some(to) => match lock(&shared.refused).get(to) {
                Some(code) => format!("{code} scripted refusal of {to}"),
                None => shared.take_fault(SmtpStage::RcptTo).unwrap_or_else(|| {
                    rcpts.push(to.to_string());
                    "250 2.1.5 ok".into()
                }),
            },
        },
        ("DATA", Some((_, rcpts))) if rcpts.is_empty() => "554 5.5.1 no valid recipients".into(),
        ("DATA", Some(_)) => return Next::Data,
        ("RSET", _) => {
            s.tx = None;
            "250 2.0.0 ok".into()
        }
        ("NOOP", _) => "250 2.0.0 ok".into(),
        ("QUIT", _) => return Next::Quit,
        ("VRFY" | "EXPN" | "HELP" | "TURN" | "STARTTLS" | "AUTH" | "BDAT" | "ETRN", _) => {
            "502 5.5.1 command not implemented".into()
        }
        _ => "500 5.5.1 command unrecognized".into(),
    };
    Next::Reply(reply)
}

/// The address in `FROM:<addr> params` (prefix matched case-insensitively).
fn parse_path<'a>(arg: &'a str, prefix: &str) -> Option<&'a str> {
    if !arg.get(..prefix.len())?.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start().strip_prefix('<')?;
    rest.split_once('>').map(|(addr, _)| addr)
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Reads one LF-terminated line into `buf` without letting a peer make it grow past `max`.
async fn read_line<R>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<Line>
where
    R: AsyncBufRead + Unpin,
{
    buf.clear();
    let n = (&mut *r).take(max as u64).read_until(b'\n', buf).await?;
    if buf.last() == Some(&b'\n') {
        return Ok(Line::Complete);
    } else if n < max {
        return Ok(Line::Eof); // peer closed, possibly mid-line
    }
    loop {
        // Discard the rest of the over-long line.
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        let newline = avail.iter().position(|&b| b == b'\n');
        let len = newline.map_or(avail.len(), |i| i + 1);
        r.consume(len);
        if newline.is_some() {
            return Ok(Line::TooLong);
        }
    }
}

/// Reads DATA content up to the lone dot, dot-unstuffed; `None` if the peer closed.
/// A message over the advertised SIZE is a protocol violation: the connection is dropped
/// rather than buffering it, which keeps the code small and memory bounded.
async fn read_data<R>(r: &mut R, line: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>>
where
    R: AsyncBufRead + Unpin,
{
    let mut data = Vec::new();
    loop {
        match read_line(r, line, MAX_MESSAGE).await? {
            Line::Eof => return Ok(None),
            Line::Complete if trim_eol(line) == b"." => break,
            Line::Complete if data.len() + line.len() <= MAX_MESSAGE => {
                data.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            }
            _ => return Err(io::Error::other("message exceeds SIZE")),
        }
    }
    // The line break before the dot belongs to the terminator.
    data.truncate(trim_eol(&data).len());
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    const T: Duration = Duration::from_secs(10);

    /// A raw SMTP client so the tests see exactly what goes over the wire.
    struct Client(BufReader<OwnedReadHalf>, OwnedWriteHalf);

    impl Client {
        async fn connect(sink: &SmtpSink) -> Client {
            let (rd, wr) = TcpStream::connect(sink.addr()).await.unwrap().into_split();
            let mut c = Client(BufReader::new(rd), wr);
            assert_eq!(c.reply().await, "220 callnotify-sink ESMTP");
            c
        }

        /// Reads a possibly multi-line reply; its lines are joined by '\n'.
        async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                self.0.read_line(&mut line).await.unwrap();
                all.push_str(line.trim_end());
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
                all.push('\n');
            }
        }

        /// Sends `line` and asserts that the reply starts with `code`.
        async fn ok(&mut self, line: &str, code: &str) -> String {
            self.1.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
            let reply = self.reply().await;
            assert!(reply.starts_with(code), "{line:.40} -> {reply}");
            reply
        }

        /// Sends one mail and returns the reply to the final dot.
        async fn mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
            self.ok(&format!("MAIL FROM:<{from}>"), "250").await;
            for t in to {
                self.ok(&format!("RCPT TO:<{t}>"), "250").await;
            }
            self.ok("DATA", "354").await;
            self.ok(&format!("{body}\r\n."), "").await
        }
    }

    #[tokio::test]
    async fn two_mails_on_one_connection_with_rset() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mut c = Client::connect(&sink).await;
        let ehlo = c.ok("EHLO client.test", "250-callnotify-sink").await;
        assert!(ehlo.contains("250-SIZE ") && ehlo.contains("8BITMIME"));
        c.ok("MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME SMTPUTF8", "250").await;
        c.ok("RCPT TO:<b@x.test>", "250").await;
        c.ok("rcpt to: <c@x.test>", "250").await;
        c.ok("DATA", "354").await;
        c.ok("Subject: one\r\n\r\n..leading dot\r\n..\r\n\r\nend\r\n.", "250").await;
        c.ok("RSET", "250").await;
        assert!(c.mail("", &["d@x.test"], "second").await.starts_with("250"));
        c.ok("QUIT", "221").await;

        let mails = sink.wait_for(2, T).await;
        assert_eq!(mails.len(), 2);
        assert_eq!(mails[0].mail_from, "a@x.test");
        assert_eq!(mails[0].rcpt_to, ["b@x.test", "c@x.test"]);
        assert_eq!(mails[0].data, b"Subject: one\r\n\r\n.leading dot\r\n.\r\n\r\nend");
        assert_eq!((&*mails[1].mail_from, &*mails[1].data), ("", &b"second"[..]));
    }

    /// RFC 2920: the replies to a pipelined group go out together once the group is
    /// read, not one write each (with Nagle's algorithm each would then wait for the
    /// client's delayed ACK, about 40 ms a mail).
    #[tokio::test]
    async fn the_replies_to_a_pipelined_group_come_in_one_write() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mut c = Client::connect(&sink).await;
        c.ok("EHLO client.test", "250-callnotify-sink").await;
        c.1.write_all(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n").await.unwrap();
        let mut first_read = vec![0; 1024];
        let n = c.0.get_mut().read(&mut first_read).await.unwrap();
        let replies = String::from_utf8_lossy(&first_read[..n]).into_owned();
        assert!(
            replies.starts_with("250 2.1.0") && replies.ends_with("354 end data with <CRLF>.<CRLF>\r\n"),
            "{replies:?}"
        );
        assert_eq!(replies.lines().count(), 3, "{replies:?}");
    }

    #[tokio::test]
    async fn errors_and_bad_sequences() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mut c = Client::connect(&sink).await;
        let long = "X".repeat(3000);
        for (line, code) in [
            ("MAIL FROM:<a@x.test>", "503"),
            ("HELO client.test", "250 "),
            ("RCPT TO:<b@x.test>", "503"),
            ("DATA", "503"),
            ("FROB", "500"),
            ("VRFY a", "502"),
            (&long, "500"),
            ("NOOP", "250"),
            ("MAIL FROM:a@x.test", "501"),
            ("mail from: <a@x.test>", "250"),
            ("MAIL FROM:<a@x.test>", "503"),
            ("RCPT TO:<>", "501"),
            ("DATA", "554"),
        ] {
            c.ok(line, code).await;
        }
        assert_eq!(sink.count(), 0);
    }

    #[tokio::test]
    async fn scripted_faults() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mut c = Client::connect(&sink).await;
        c.ok("EHLO client.test", "250").await;
        sink.fail_next(SmtpStage::DataEnd, 451, 1);
        assert!(c.mail("a@x.test", &["b@x.test"], "one").await.starts_with("451"));
        assert_eq!(sink.count(), 0);
        assert!(c.mail("a@x.test", &["b@x.test"], "one").await.starts_with("250"));

        sink.fail_next(SmtpStage::RcptTo, 550, 1);
        sink.fail_next(SmtpStage::MailFrom, 421, 2);
        for (line, code) in [
            ("MAIL FROM:<a@x.test>", "421"),
            ("MAIL FROM:<a@x.test>", "421"),
            ("MAIL FROM:<a@x.test>", "250"),
            ("RCPT TO:<bad@x.test>", "550"),
            ("RCPT TO:<good@x.test>", "250"),
            ("DATA", "354"),
            ("two\r\n.", "250"),
        ] {
            c.ok(line, code).await;
        }
        let mails = sink.wait_for(2, T).await;
        assert_eq!(mails.len(), 2);
        assert_eq!(mails[1].rcpt_to, ["good@x.test"]);
    }

    #[tokio::test]
    async fn subscribe_without_keeping_and_shutdown() {
        let opts = SinkOptions { port: 0, keep_mails: false };
        let sink = SmtpSink::start_with(opts).await.unwrap();
        let mut events = sink.subscribe();
        let mut c = Client::connect(&sink).await;
        c.ok("EHLO client.test", "250").await;
        assert!(c.mail("a@x.test", &["b@x.test"], "hi").await.starts_with("250"));
        assert_eq!(events.recv().await.unwrap().data, b"hi");
        assert!(sink.wait_for(1, T).await.is_empty());
        assert_eq!(sink.count(), 1);
        sink.wait_for(2, Duration::from_millis(50)).await; // times out, does not hang

        let addr = sink.addr();
        sink.shutdown().await;
        let mut buf = [0u8; 16];
        assert_eq!(c.0.read(&mut buf).await.unwrap_or(0), 0, "connection closed");
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn lettre_single_and_pooled_concurrent() {
        use lettre::transport::smtp::PoolConfig;
        use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
        let sink = SmtpSink::start(0).await.unwrap();
        let transport = |pool: PoolConfig| {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
                .port(sink.port())
                .pool_config(pool)
                .build()
        };
        let mail = |i: usize| {
            Message::builder()
                .from("from@x.test".parse().unwrap())
                .to(format!("to{i}@x.test").parse().unwrap())
                .subject(format!("着信 {i}"))
                .body(format!(".dot {i}\r\n本文"))
                .unwrap()
        };
        transport(PoolConfig::new().max_size(1)).send(mail(0)).await.unwrap();

        let pooled = transport(PoolConfig::new().max_size(4));
        let mut tasks = JoinSet::new();
        for i in 1..=20 {
            let (t, m) = (pooled.clone(), mail(i));
            tasks.spawn(async move { t.send(m).await.unwrap() });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let mails = sink.wait_for(21, T).await;
        let mut rcpts: Vec<_> = mails.iter().map(|m| m.rcpt_to[0].clone()).collect();
        rcpts.sort();
        rcpts.dedup();
        assert_eq!(rcpts.len(), 21);
        let parsed = mail_parser::MessageParser::default().parse(&mails[0].data).unwrap();
        assert_eq!(parsed.subject(), Some("着信 0"));
        assert!(parsed.body_text(0).unwrap().starts_with(".dot 0"));
    }
}
