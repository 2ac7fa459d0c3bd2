//! One SMTP client connection (RFC 5321), pipelining where the server offers it
//! (RFC 2920): MAIL, RCPT and DATA go out in one write and the message with its closing
//! `.` in another, so a mail costs two round trips instead of four and two writes
//! instead of five; the pool sends the next mail's envelope with the message
//! ([`Connection::push_envelope`]), one write and one round trip. Speaks EHLO (HELO if
//! refused), STARTTLS, implicit TLS, AUTH PLAIN and LOGIN, SMTPUTF8 and 8BITMIME, and
//! dot-stuffs the message.
//!
//! A refusal leaves the connection in step with the server: every reply of the
//! transaction has been read, and the next transaction starts with RSET (in the same
//! write as its envelope where the server pipelines), so the connection is reused. A
//! connection that failed in any other way is dropped by its owner: after such an error
//! nothing here tries to bring the session back in step.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use lettre::address::Envelope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;

/// A reply longer than this (all its lines) is not SMTP; bounds what a server can make
/// the client buffer.
const MAX_REPLY: usize = 64 * 1024;

/// A server's reply: its code and, for errors, its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The lines' text without codes, joined by spaces; kept only for codes ≥ 400.
    pub text: String,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Why a transaction or the session set-up failed.
#[derive(Debug)]
pub enum ClientError {
    /// The server refused a command of a mail transaction; the connection stays in step
    /// and may carry the next mail.
    Refused(Reply),
    /// The server refused MAIL FROM: the sender, `smtp.from`, the same for every mail (a
    /// relay not taking it from this account or this address), so not the mail's fault.
    /// In step as after [`ClientError::Refused`].
    SenderRefused(Reply),
    /// The server refused the session: greeting, EHLO, STARTTLS or AUTH. Not the mail's
    /// fault, so never a reason to give the mail up.
    Session(Reply),
    /// The connection failed or the server closed it; `answered` tells whether any reply
    /// of this transaction had come back before.
    Closed {
        source: std::io::Error,
        answered: bool,
    },
    Tls(String),
    /// The server does not speak SMTP as we understand it, or lacks what we need for
    /// the session (a TLS upgrade, an AUTH mechanism we know).
    Protocol(String),
    /// This mail can never be sent over this server (a non-ASCII address without SMTPUTF8).
    Unsendable(String),
}

impl ClientError {
    /// A refusal of MAIL FROM, told as the sender's (421, the server closing, and 530, a
    /// relay wanting a login or TLS first, stay what they are).
    fn of_sender(self) -> Self {
        match self {
            Self::Refused(reply) if reply.code != 421 && reply.code != 530 => Self::SenderRefused(reply),
            other => other,
        }
    }

    /// Whether the transaction was answered with a refusal and the connection stays in
    /// step with the server.
    pub fn refused_in_step(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::SenderRefused(_))
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(r) => write!(f, "the mail server refused: {r}"),
            Self::SenderRefused(r) => write!(f, "the mail server refused the sender (smtp.from): {r}"),
            Self::Session(r) => write!(f, "the mail server refused the session: {r}"),
            Self::Closed { source, .. } => write!(f, "the connection to the mail server failed: {source}"),
            Self::Tls(e) => write!(f, "TLS with the mail server failed: {e}"),
            Self::Protocol(e) | Self::Unsendable(e) => f.write_str(e),
        }
    }
}

/// Each variant's `Display` already includes what caused it, so there is no `source`
/// for an error-chain printer to repeat.
impl std::error::Error for ClientError {}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Default, Clone, Copy)]
struct Extensions {
    pipelining: bool,
    starttls: bool,
    smtputf8: bool,
    eight_bit_mime: bool,
    auth_plain: bool,
    auth_login: bool,
}

impl Extensions {
    /// Reads one line of an EHLO reply (after the greeting line).
    fn add(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line).to_ascii_uppercase();
        let mut words = line.split([' ', '=']);
        match words.next().unwrap_or("") {
            "PIPELINING" => self.pipelining = true,
            "STARTTLS" => self.starttls = true,
            "SMTPUTF8" => self.smtputf8 = true,
            "8BITMIME" => self.eight_bit_mime = true,
            "AUTH" => {
                for mechanism in words {
                    self.auth_plain |= mechanism == "PLAIN";
                    self.auth_login |= mechanism == "LOGIN";
                }
            }
            _ => {}
        }
    }
}

/// A plain TCP stream, or one upgraded to TLS (implicitly or by STARTTLS).
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Only while the socket is moved into a TLS handshake; a connection whose handshake
    /// failed is dropped.
    Gone,
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(bytes).await,
            Self::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Self::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn read_into(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read_buf(buf).await,
            Self::Tls(s) => s.read_buf(buf).await,
            Self::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// The TLS client set-up and the name the server's certificate must carry.
pub struct TlsTarget<'a> {
    pub config: &'a Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsTarget<'_> {
    async fn wrap(&self, tcp: TcpStream) -> Result<Stream, ClientError> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector.connect(self.name.clone(), tcp).await.map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// How to open a session: TLS, the EHLO name, credentials.
pub struct Session<'a> {
    /// Implicit TLS (`smtp.tls = "tls"`) or STARTTLS, with what to check the server by.
    pub tls: Option<(TlsStart, TlsTarget<'a>)>,
    /// The name given in EHLO.
    pub hello: &'a str,
    /// User and password for AUTH.
    pub credentials: Option<(&'a str, &'a str)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStart {
    Implicit,
    Starttls,
}

pub struct Connection {
    stream: Stream,
    /// Bytes read from the server and not yet parsed: `input[parsed..]`.
    input: Vec<u8>,
    parsed: usize,
    /// The commands or message being written; kept from mail to mail.
    output: Vec<u8>,
    ext: Extensions,
    /// A transaction was refused part-way: the next one starts with RSET, in case the
    /// server still holds its MAIL.
    reset: bool,
    /// The connection failed, or is out of step, or the server said it closes it (421):
    /// no mail may follow on it.
    broken: bool,
}

impl Connection {
    /// Greets the server on a connected socket and sets the session up: TLS, EHLO, AUTH.
    pub async fn open(tcp: TcpStream, session: &Session<'_>) -> Result<Self, ClientError> {
        let stream = match &session.tls {
            Some((TlsStart::Implicit, target)) => target.wrap(tcp).await?,
            _ => Stream::Plain(tcp),
        };
        let mut conn = Self {
            stream,
            input: Vec::with_capacity(1024),
            parsed: 0,
            output: Vec::new(),
            ext: Extensions::default(),
            reset: false,
            broken: false,
        };
        let greeting = conn.reply(false).await?;
        if greeting.code / 100 != 2 {
            return Err(ClientError::Session(greeting));
        }
        conn.hello(session.hello).await?;
        if let Some((TlsStart::Starttls, target)) = &session.tls {
            conn.starttls(target).await?;
            conn.hello(session.hello).await?;
        }
        if let Some((user, password)) = session.credentials {
            conn.auth(user, password).await?;
        }
        Ok(conn)
    }

    /// Sends MAIL, RCPT and DATA for `envelope` (in one write where the server offers
    /// PIPELINING) and reads the replies up to the 354 that asks for the message.
    pub async fn envelope(&mut self, envelope: &Envelope, eight_bit: bool) -> Result<(), ClientError> {
        self.output.clear();
        if self.ext.pipelining {
            self.push_envelope(envelope, eight_bit)?;
            self.flush().await.map_err(closed(false))?;
            return self.envelope_replies(envelope).await;
        }
        let utf8 = self.sendable(envelope)?;
        if std::mem::take(&mut self.reset) {
            self.output.extend_from_slice(b"RSET\r\n");
            self.flush().await.map_err(closed(false))?;
            self.expect_reset().await?;
        }
        // Refused part-way, the server may still hold this transaction's MAIL.
        self.reset = true;
        self.push_mail_from(envelope, eight_bit, utf8);
        self.flush().await.map_err(closed(false))?;
        self.expect(250, false).await.map_err(ClientError::of_sender)?;
        for rcpt in envelope.to() {
            push_command(&mut self.output, b"RCPT TO:<", rcpt.as_ref(), b">");
            self.flush().await.map_err(closed(true))?;
            self.expect(250, true).await?;
        }
        self.output.extend_from_slice(b"DATA\r\n");
        self.flush().await.map_err(closed(true))?;
        self.expect(354, true).await?;
        self.reset = false;
        Ok(())
    }

    /// Whether another mail may go out on this connection: nothing failed on it, it is in
    /// step with the server, and the server has not said it closes it.
    pub fn usable(&self) -> bool {
        !self.broken
    }

    /// Whether the server has said nothing since the last reply: an idle connection it
    /// timed out (postfix's `smtpd_timeout`: 421, then it closes), or closed, has that
    /// 421 or its end waiting to be read, and the next mail's first command would be
    /// answered by it (a retry later for nothing). Reads without waiting; what it reads
    /// ends the connection anyway.
    pub fn quiet(&self) -> bool {
        if self.parsed < self.input.len() {
            return false;
        }
        let tcp = match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
            Stream::Gone => return false,
        };
        matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Whether the server offers PIPELINING: then the envelope of another mail may
    /// follow a message in the same write ([`Connection::push_envelope`]).
    pub fn pipelining(&self) -> bool {
        self.ext.pipelining
    }

    /// Appends MAIL, RCPT and DATA for `envelope` to what is written next (PIPELINING
    /// only). RFC 2920 (3.1) lets a message be the first of a group of commands, so the
    /// next mail's envelope may go out with the previous mail's message. After a refused
    /// transaction, RSET goes first.
    pub fn push_envelope(&mut self, envelope: &Envelope, eight_bit: bool) -> Result<(), ClientError> {
        debug_assert!(self.ext.pipelining);
        let utf8 = self.sendable(envelope)?;
        if self.reset {
            self.output.extend_from_slice(b"RSET\r\n");
        }
        self.push_mail_from(envelope, eight_bit, utf8);
        for rcpt in envelope.to() {
            push_command(&mut self.output, b"RCPT TO:<", rcpt.as_ref(), b">");
        }
        self.output.extend_from_slice(b"DATA\r\n");
        Ok(())
    }

    /// Reads the replies to a pipelined envelope, up to the 354 that asks for the message.
    /// A refusal is returned once every reply of the envelope has been read, so the
    /// connection stays in step; a server that refused part of it and still asks for
    /// the message is out of step, and that is an error of its own.
    pub async fn envelope_replies(&mut self, envelope: &Envelope) -> Result<(), ClientError> {
        if std::mem::take(&mut self.reset) {
            self.expect_reset().await?;
        }
        // MAIL, then each RCPT. The first refusal is the answer (after a refused MAIL,
        // the RCPTs' are of course refused too).
        let mut refused = None;
        for answered in std::iter::once(false).chain(envelope.to().iter().map(|_| true)) {
            let reply = self.expect(250, answered).await;
            let reply = if answered { reply } else { reply.map_err(ClientError::of_sender) };
            match reply {
                Ok(()) => {}
                // The server closes the connection after 421: no more replies come.
                Err(ClientError::Refused(reply)) if reply.code == 421 => return Err(ClientError::Refused(reply)),
                Err(e @ (ClientError::Refused(_) | ClientError::SenderRefused(_))) => refused = refused.or(Some(e)),
                // A refusal stays the mail's answer should the connection fail after it
                // (the connection is then no longer usable).
                Err(e) => return Err(refused.unwrap_or(e)),
            }
        }
        match (self.expect(354, true).await, refused) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(refusal)) => {
                self.broken = true;
                Err(ClientError::Protocol(format!(
                    "the mail server asked for the message after refusing its envelope ({refusal})"
                )))
            }
            (Err(ClientError::Refused(data)), refused) => {
                self.reset = true;
                Err(refused.unwrap_or(ClientError::Refused(data)))
            }
            (Err(_), Some(refusal)) => Err(refusal),
            (Err(e), None) => Err(e),
        }
    }

    /// Reads the reply to RSET.
    async fn expect_reset(&mut self) -> Result<(), ClientError> {
        match self.expect(250, false).await {
            // The server closing (it timed the connection out): a refusal like any 421.
            Err(ClientError::Refused(reply)) if reply.code == 421 => {
                self.broken = true;
                Err(ClientError::Refused(reply))
            }
            Err(ClientError::Refused(reply)) => {
                self.broken = true;
                Err(ClientError::Protocol(format!("the mail server refused RSET after a refusal: {reply}")))
            }
            other => other,
        }
    }

    /// Appends `message`, dot-stuffed and with its closing `.`, to what is written next.
    pub fn push_message(&mut self, message: &[u8]) {
        dot_stuff(message, &mut self.output);
    }

    /// Writes what was pushed, after the server's 354.
    pub async fn flush_output(&mut self) -> Result<(), ClientError> {
        self.flush().await.map_err(closed(true))
    }

    /// Reads the server's answer to a message: `Ok` once it has accepted the mail.
    pub async fn message_reply(&mut self) -> Result<(), ClientError> {
        self.expect(250, true).await
    }

    /// Whether `envelope`'s addresses need SMTPUTF8; an error if the server lacks it.
    fn sendable(&self, envelope: &Envelope) -> Result<bool, ClientError> {
        let from = envelope.from().map_or("", |a| a.as_ref());
        let utf8 = !from.is_ascii() || envelope.to().iter().any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if utf8 && !self.ext.smtputf8 {
            return Err(ClientError::Unsendable(
                "the mail server does not accept non-ASCII addresses (no SMTPUTF8)".into(),
            ));
        }
        Ok(utf8)
    }

    /// Appends MAIL FROM (`utf8` from [`Connection::sendable`]).
    fn push_mail_from(&mut self, envelope: &Envelope, eight_bit: bool, utf8: bool) {
        let from = envelope.from().map_or("", |a| a.as_ref());
        self.output.extend_from_slice(b"MAIL FROM:<");
        self.output.extend_from_slice(from.as_bytes());
        self.output.push(b'>');
        if self.ext.eight_bit_mime && eight_bit {
            self.output.extend_from_slice(b" BODY=8BITMIME");
        }
        if utf8 {
            self.output.extend_from_slice(b" SMTPUTF8");
        }
        self.output.extend_from_slice(b"\r\n");
    }

    async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        push_command(&mut self.output, b"EHLO ", name, b"");
        self.flush().await.map_err(closed(false))?;
        self.ext = Extensions::default();
        let ehlo = self.reply(true).await?;
        if ehlo.code / 100 == 2 {
            return Ok(());
        }
        // A server not taking mail now (421: it closes): its answer, for a retry later.
        if ehlo.code / 100 == 4 {
            return Err(ClientError::Session(ehlo));
        }
        // A server without ESMTP (500, 502): plain HELO, no extensions.
        self.ext = Extensions::default();
        push_command(&mut self.output, b"HELO ", name, b"");
        self.flush().await.map_err(closed(true))?;
        self.expect_session(250).await
    }

    async fn starttls(&mut self, target: &TlsTarget<'_>) -> Result<(), ClientError> {
        if !self.ext.starttls {
            return Err(ClientError::Tls("the mail server does not offer STARTTLS".into()));
        }
        self.output.extend_from_slice(b"STARTTLS\r\n");
        self.flush().await.map_err(closed(false))?;
        self.expect_session(220).await?;
        if self.parsed < self.input.len() {
            // Plaintext sent before the handshake could be an attacker's injection.
            return Err(ClientError::Protocol("the mail server sent data before the TLS handshake".into()));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Tls("STARTTLS on a connection already in TLS".into()));
        };
        self.stream = target.wrap(tcp).await?;
        Ok(())
    }

    async fn auth(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        if self.ext.auth_plain {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            push_command(&mut self.output, b"AUTH PLAIN ", &token, b"");
            self.flush().await.map_err(closed(false))?;
            return self.expect_session(235).await;
        }
        if !self.ext.auth_login {
            return Err(ClientError::Protocol("the mail server offers neither AUTH PLAIN nor AUTH LOGIN".into()));
        }
        self.output.extend_from_slice(b"AUTH LOGIN\r\n");
        self.flush().await.map_err(closed(false))?;
        self.expect_session(334).await?;
        for (secret, code) in [(user, 334), (password, 235)] {
            push_command(&mut self.output, b"", &BASE64.encode(secret), b"");
            self.flush().await.map_err(closed(true))?;
            self.expect_session(code).await?;
        }
        Ok(())
    }

    /// Writes and clears the output buffer.
    async fn flush(&mut self) -> std::io::Result<()> {
        let result = self.stream.write_all(&self.output).await;
        self.output.clear();
        self.broken |= result.is_err();
        result
    }

    /// Reads a reply of a mail transaction; a reply of another class than `code` (its
    /// first digit, as RFC 5321 has clients judge replies: 251 is a 250) is a refusal.
    async fn expect(&mut self, code: u16, answered: bool) -> Result<(), ClientError> {
        let reply = self.reply(false).await.map_err(|e| match e {
            ClientError::Closed { source, .. } => ClientError::Closed { source, answered },
            other => other,
        })?;
        if reply.code / 100 == code / 100 {
            Ok(())
        } else {
            Err(ClientError::Refused(reply))
        }
    }

    /// Reads a reply of the session set-up; one of another class than `code` is a
    /// session refusal.
    async fn expect_session(&mut self, code: u16) -> Result<(), ClientError> {
        let reply = self.reply(false).await?;
        if reply.code / 100 == code / 100 {
            Ok(())
        } else {
            Err(ClientError::Session(reply))
        }
    }

    /// Reads one reply, all its lines. `ehlo`: each line after the first is an extension.
    async fn reply(&mut self, ehlo: bool) -> Result<Reply, ClientError> {
        let reply = self.read_reply(ehlo).await;
        // Unreadable, or 421: the server is gone or going.
        self.broken |= reply.as_ref().map_or(true, |r| r.code == 421);
        reply
    }

    async fn read_reply(&mut self, ehlo: bool) -> Result<Reply, ClientError> {
        let mut code = None;
        let mut text = String::new();
        loop {
            let line = loop {
                if let Some(end) = memchr::memmem::find(&self.input[self.parsed..], b"\r\n") {
                    let start = self.parsed;
                    self.parsed += end + 2;
                    break start..start + end;
                }
                if self.input.len() - self.parsed > MAX_REPLY {
                    return Err(ClientError::Protocol("the mail server's reply is too long".into()));
                }
                self.input.drain(..self.parsed);
                self.parsed = 0;
                self.input.reserve(1024);
                match self.stream.read_into(&mut self.input).await {
                    Ok(0) => {
                        let source = std::io::ErrorKind::UnexpectedEof.into();
                        return Err(ClientError::Closed { source, answered: false });
                    }
                    Ok(_) => {}
                    Err(source) => return Err(ClientError::Closed { source, answered: false }),
                }
            };
            let line = &self.input[line];
            let (this, more, rest) = parse_line(line).ok_or_else(|| {
                ClientError::Protocol(format!(
                    "the mail server's reply is not SMTP: {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(80)])
                ))
            })?;
            match code {
                None => code = Some(this),
                Some(first) if first != this => {
                    return Err(ClientError::Protocol("the mail server's reply changes code between lines".into()))
                }
                Some(_) => {
                    if ehlo {
                        self.ext.add(rest);
                    }
                }
            }
            if this >= 400 {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(&String::from_utf8_lossy(rest));
            }
            if !more {
                let code = code.expect("set by the first line");
                if self.parsed == self.input.len() {
                    self.input.clear();
                    self.parsed = 0;
                }
                return Ok(Reply { code, text });
            }
        }
    }
}

/// `ddd text`, `ddd-text` (more lines follow) or `ddd`: the code, whether more lines
/// follow, and the text.
fn parse_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = digits.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Some((code, false, &[])),
        Some(b' ') => Some((code, false, &line[4..])),
        Some(b'-') => Some((code, true, &line[4..])),
        Some(_) => None,
    }
}

fn push_command(out: &mut Vec<u8>, verb: &[u8], arg: &str, end: &[u8]) {
    out.extend_from_slice(verb);
    out.extend_from_slice(arg.as_bytes());
    out.extend_from_slice(end);
    out.extend_from_slice(b"\r\n");
}

/// Appends the message as DATA content: a `.` doubled at the start of every line, the
/// last line ended, then the closing `.` line.
fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + 8);
    let mut from = 0;
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    for at in memchr::memmem::find_iter(message, b"\n.") {
        out.extend_from_slice(&message[from..=at]);
        out.push(b'.');
        from = at + 1;
    }
    out.extend_from_slice(&message[from..]);
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

fn closed(answered: bool) -> impl Fn(std::io::Error) -> ClientError {
    move |source| ClientError::Closed { source, answered }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    /// A refusal of MAIL FROM is the sender's (`smtp.from`), but for 421 (the server
    /// closing) and 530 (a relay wanting a login or TLS first: `smtp.username`,
    /// `smtp.tls`), which its log line would have blamed on `smtp.from`.
    #[test]
    fn a_refused_mail_from_is_the_sender_s_but_for_a_close_or_a_login_wanted() {
        let refused = |code| ClientError::Refused(Reply { code, text: "no".into() }).of_sender();
        assert!(matches!(refused(553), ClientError::SenderRefused(Reply { code: 553, .. })));
        assert!(matches!(refused(554), ClientError::SenderRefused(_)));
        assert!(matches!(refused(530), ClientError::Refused(_)));
        assert!(matches!(refused(421), ClientError::Refused(_)));
    }

    const USER: &str = "callnotify";
    const PASSWORD: &str = "s3cret";

    /// A scripted one-connection SMTP server. It advertises `extensions` (`NO-EHLO`: it
    /// refuses EHLO), checks AUTH against [`USER`]/[`PASSWORD`], and returns every line it
    /// read, the message as one entry, still dot-stuffed, followed by `(more in the same
    /// write)` when the client's next commands came with it. It accepts a recipient with
    /// 251 (will forward), a success other than 250, but refuses `refused@…`, and a
    /// message containing `REJECT ME`; for `closing@…` it answers 421 and hangs up, for
    /// `refused-then-gone@…` 550 and hangs up. Without PIPELINING advertised
    /// it refuses a command that arrives before the previous one was answered, as postfix
    /// does; with `hold`, it answers MAIL and RCPT only once DATA has arrived.
    async fn server(extensions: &'static [&'static str], hold: bool) -> (u16, JoinHandle<Vec<String>>) {
        server_with(extensions, hold, None).await
    }

    /// [`server`], doing TLS from the start (`Implicit`) or after STARTTLS (which it then
    /// advertises) with `acceptor`.
    pub(crate) async fn server_with(
        extensions: &'static [&'static str],
        hold: bool,
        tls: Option<(TlsStart, TlsAcceptor)>,
    ) -> (u16, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = async move {
            let mut seen = Vec::new();
            serve_one(&listener, extensions, hold, tls, &mut seen).await;
            seen
        };
        (port, tokio::spawn(serve))
    }

    /// [`server`] for `connections` connections, one after the other, without TLS; what
    /// each read is returned one after the other.
    pub(crate) async fn server_for(
        extensions: &'static [&'static str],
        connections: usize,
    ) -> (u16, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = async move {
            let mut seen = Vec::new();
            for _ in 0..connections {
                seen.push("(connection)".to_owned());
                serve_one(&listener, extensions, false, None, &mut seen).await;
            }
            seen
        };
        (port, tokio::spawn(serve))
    }

    async fn serve_one(
        listener: &TcpListener,
        extensions: &'static [&'static str],
        hold: bool,
        tls: Option<(TlsStart, TlsAcceptor)>,
        seen: &mut Vec<String>,
    ) {
        let (socket, _) = listener.accept().await.unwrap();
        match tls {
            None => {
                session(&mut BufReader::new(socket), extensions, hold, false, seen).await;
            }
            Some((TlsStart::Implicit, acceptor)) => {
                let Ok(tls) = acceptor.accept(socket).await else { return };
                session(&mut BufReader::new(tls), extensions, hold, false, seen).await;
            }
            Some((TlsStart::Starttls, acceptor)) => {
                let mut plain = BufReader::new(socket);
                if session(&mut plain, extensions, hold, true, seen).await {
                    let Ok(tls) = acceptor.accept(plain.into_inner()).await else { return };
                    seen.push("(TLS)".into());
                    session(&mut BufReader::new(tls), extensions, hold, false, seen).await;
                }
            }
        }
    }

    /// Serves commands until the client leaves, or asks for STARTTLS (when `starttls`
    /// is offered; then returns true). The greeting is sent unless this is the session
    /// after a STARTTLS.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        rd: &mut BufReader<S>,
        extensions: &'static [&'static str],
        hold: bool,
        starttls: bool,
        seen: &mut Vec<String>,
    ) -> bool {
        let pipelining = extensions.contains(&"PIPELINING");
        let (mut held, mut login, mut recipients) = (String::new(), None, 0);
        if seen.last().is_none_or(|l| l != "(TLS)") {
            rd.get_mut().write_all(b"220 scripted ESMTP\r\n").await.unwrap();
            rd.get_mut().flush().await.unwrap();
        }
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                return false;
            }
            let line = line.trim_end().to_owned();
            seen.push(line.clone());
            let verb = line.split(' ').next().unwrap().to_ascii_uppercase();
            let reply = if !pipelining && !rd.buffer().is_empty() {
                "554 5.5.0 improper command pipelining".to_owned()
            } else if let Some(step) = login.take() {
                match (line == BASE64.encode([USER, PASSWORD][step]), step) {
                    (false, _) => "535 5.7.8 bad credentials",
                    (true, 0) => {
                        login = Some(1);
                        "334 UGFzc3dvcmQ6"
                    }
                    (true, _) => "235 2.7.0 ok",
                }
                .to_owned()
            } else {
                match verb.as_str() {
                    "EHLO" if extensions.contains(&"NO-EHLO") => "500 5.5.1 what?".to_owned(),
                    "EHLO" if extensions.contains(&"BUSY") => {
                        rd.get_mut().write_all(b"421 4.7.0 too busy, try later\r\n").await.unwrap();
                        rd.get_mut().flush().await.unwrap();
                        return false;
                    }
                    "EHLO" => {
                        let offered = extensions.iter().fold("250-scripted".to_owned(), |r, e| r + "\r\n250-" + e);
                        offered + if starttls { "\r\n250-STARTTLS" } else { "" } + "\r\n250 SIZE 1000000"
                    }
                    "STARTTLS" if starttls => {
                        rd.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await.unwrap();
                        rd.get_mut().flush().await.unwrap();
                        return true;
                    }
                    "AUTH" if line == format!("AUTH PLAIN {}", BASE64.encode(format!("\0{USER}\0{PASSWORD}"))) => {
                        "235 2.7.0 ok".to_owned()
                    }
                    "AUTH" if line == "AUTH LOGIN" => {
                        login = Some(0);
                        "334 VXNlcm5hbWU6".to_owned()
                    }
                    "AUTH" => "535 5.7.8 bad credentials".to_owned(),
                    "MAIL" | "RCPT" if hold => {
                        held.push_str("250 ok\r\n");
                        continue;
                    }
                    "MAIL" => {
                        recipients = 0;
                        "250 ok".to_owned()
                    }
                    "RCPT" if line.contains("<refused@") => "550 5.1.1 no such user".to_owned(),
                    "RCPT" if line.contains("<refused-then-gone@") => {
                        rd.get_mut().write_all(b"550 5.1.1 no such user\r\n").await.unwrap();
                        rd.get_mut().flush().await.unwrap();
                        return false;
                    }
                    "RCPT" if line.contains("<slow@") => {
                        // A recipient check that never ends: nothing more is answered.
                        let mut rest = String::new();
                        while rd.read_line(&mut rest).await.unwrap_or(0) > 0 {
                            rest.clear();
                        }
                        return false;
                    }
                    "RCPT" if line.contains("<closing@") => {
                        rd.get_mut().write_all(b"421 4.3.2 shutting down\r\n").await.unwrap();
                        rd.get_mut().flush().await.unwrap();
                        return false;
                    }
                    "RCPT" => {
                        recipients += 1;
                        "251 2.1.5 not local; will forward".to_owned()
                    }
                    "DATA" if recipients == 0 && !hold => "554 5.5.1 no valid recipients".to_owned(),
                    "DATA" => {
                        rd.get_mut().write_all(format!("{held}354 go ahead\r\n").as_bytes()).await.unwrap();
                        rd.get_mut().flush().await.unwrap();
                        let mut message = String::new();
                        while !message.ends_with("\r\n.\r\n") {
                            if rd.read_line(&mut message).await.unwrap_or(0) == 0 {
                                // The client left after the 354 (it had stopped waiting).
                                return false;
                            }
                        }
                        let refused = message.contains("REJECT ME");
                        seen.push(message);
                        if !rd.buffer().is_empty() {
                            seen.push("(more in the same write)".into());
                        }
                        if refused { "554 5.7.1 rejected" } else { "250 2.0.0 queued" }.to_owned()
                    }
                    _ => "250 ok".to_owned(),
                }
            };
            rd.get_mut().write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
            rd.get_mut().flush().await.unwrap();
        }
    }

    /// A file of the workspace's test TLS material (`tests/fixtures/tls`): a test CA
    /// (`ca.crt`) and a certificate it issued for `localhost` (`site.crt`, `site.key`).
    pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
        [env!("CARGO_MANIFEST_DIR"), "..", "tests", "fixtures", "tls", name].iter().collect()
    }

    /// A server presenting the test certificate for `localhost`.
    pub(crate) fn acceptor() -> TlsAcceptor {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_file(fixture("site.crt")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(fixture("site.key")).unwrap();
        let server = tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key);
        TlsAcceptor::from(Arc::new(server.unwrap()))
    }

    /// Opens a TLS session as `name` (`start` as the server does it) and sends a mail.
    async fn send_over_tls(
        start: TlsStart,
        name: &str,
        credentials: Option<(&str, &str)>,
    ) -> (Result<(), ClientError>, Vec<String>) {
        let roots = super::super::smtp::private_roots(&fixture("ca.crt")).unwrap();
        let config = Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
        let (port, server) = server_with(&["PIPELINING", "AUTH PLAIN"], false, Some((start, acceptor()))).await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let target = TlsTarget { config: &config, name: ServerName::try_from(name.to_owned()).unwrap() };
        let session = Session { tls: Some((start, target)), hello: "client.test", credentials };
        let sent = async {
            let mut conn = Connection::open(tcp, &session).await?;
            send_one(&mut conn, &envelope(), b"Subject: hi\r\n\r\nover TLS\r\n").await
        };
        let sent = tokio::time::timeout(Duration::from_secs(10), sent).await.expect("the client hung");
        (sent, server.await.unwrap())
    }

    fn envelope() -> Envelope {
        Envelope::new(Some("no-reply@example.jp".parse().unwrap()), vec!["taro@example.jp".parse().unwrap()]).unwrap()
    }

    /// One mail, the way the pool sends it when nothing waits behind it.
    async fn send_one(conn: &mut Connection, envelope: &Envelope, message: &[u8]) -> Result<(), ClientError> {
        conn.envelope(envelope, !message.is_ascii()).await?;
        conn.push_message(message);
        conn.flush_output().await?;
        conn.message_reply().await
    }

    /// Opens a session and sends `message`, within 10 s: a client waiting for a reply
    /// the server holds back would hang. Then returns what the server read.
    async fn send(
        (port, server): (u16, JoinHandle<Vec<String>>),
        credentials: Option<(&str, &str)>,
        message: &[u8],
    ) -> Result<Vec<String>, ClientError> {
        let sending = async {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut conn = Connection::open(tcp, &Session { tls: None, hello: "client.test", credentials }).await?;
            send_one(&mut conn, &envelope(), message).await
        };
        tokio::time::timeout(Duration::from_secs(10), sending).await.expect("the client hung")?;
        Ok(server.await.unwrap())
    }

    #[tokio::test]
    async fn with_pipelining_offered_mail_rcpt_and_data_go_out_without_waiting_for_replies() {
        // The server answers nothing before DATA: a client waiting for each reply would hang.
        let seen = send(server(&["PIPELINING"], true).await, None, b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
        assert_eq!(&seen[1..4], ["MAIL FROM:<no-reply@example.jp>", "RCPT TO:<taro@example.jp>", "DATA"]);
        assert_eq!(seen[4], "Subject: hi\r\n\r\nbody\r\n.\r\n");
    }

    #[tokio::test]
    async fn without_pipelining_each_command_waits_for_its_reply() {
        let seen =
            send(server(&[], false).await, None, b"Subject: hi\r\n\r\nbody\r\n").await.expect("no command refused");
        assert_eq!(&seen[1..4], ["MAIL FROM:<no-reply@example.jp>", "RCPT TO:<taro@example.jp>", "DATA"]);
    }

    #[tokio::test]
    async fn a_server_that_refuses_ehlo_is_greeted_with_helo() {
        let seen = send(server(&["NO-EHLO"], false).await, None, b"Subject: hi\r\n\r\nbody").await.unwrap();
        assert_eq!(&seen[..2], ["EHLO client.test", "HELO client.test"]);
        assert_eq!(seen[5], "Subject: hi\r\n\r\nbody\r\n.\r\n", "the last line is ended before the dot");
    }

    /// R-M4: a server too busy answers EHLO with 421 and closes: that is its answer (the
    /// session refused, for a retry later), not a HELO sent to a closed connection and
    /// counted as a server not answering, three of which opened the breaker.
    #[tokio::test]
    async fn an_ehlo_answered_421_is_the_server_s_refusal_not_a_reason_to_try_helo() {
        let (port, server) = server(&["BUSY"], false).await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let opened = Connection::open(tcp, &Session { tls: None, hello: "client.test", credentials: None }).await;
        let refused = opened.err().expect("refused");
        assert!(matches!(&refused, ClientError::Session(Reply { code: 421, .. })), "{refused}");
        assert_eq!(server.await.unwrap(), ["EHLO client.test"]);
    }

    #[tokio::test]
    async fn logs_in_with_auth_plain_or_auth_login_whichever_is_offered() {
        let credentials = Some((USER, PASSWORD));
        let seen = send(server(&["PIPELINING", "AUTH LOGIN PLAIN"], false).await, credentials, b"x\r\n").await.unwrap();
        assert!(seen[1].starts_with("AUTH PLAIN "), "{seen:?}");
        let seen = send(server(&["AUTH=LOGIN"], false).await, credentials, b"x\r\n").await.unwrap();
        assert_eq!(seen[1], "AUTH LOGIN");
    }

    #[tokio::test]
    async fn a_refused_login_is_a_session_refusal_not_a_refused_mail() {
        for offered in ["AUTH PLAIN", "AUTH LOGIN"] {
            let extensions: &'static [&'static str] =
                if offered == "AUTH PLAIN" { &["AUTH PLAIN"] } else { &["AUTH LOGIN"] };
            let refused = send(server(extensions, false).await, Some((USER, "wrong")), b"x\r\n").await.unwrap_err();
            assert!(matches!(&refused, ClientError::Session(Reply { code: 535, .. })), "{offered}: {refused}");
            assert!(!refused.to_string().contains("wrong"), "the password is never in an error: {refused}");
        }
        let none = send(server(&[], false).await, Some((USER, PASSWORD)), b"x\r\n").await.unwrap_err();
        assert!(none.to_string().contains("neither AUTH PLAIN nor AUTH LOGIN"), "{none}");
    }

    /// Pipelined, a refused recipient the server hangs up after leaves the next
    /// recipient's reply unread: the refusal is still the envelope's answer (R-M4: a 5xx
    /// is given up, not retried as a dropped connection), and the connection is not used
    /// again.
    #[tokio::test]
    async fn a_refusal_stays_the_answer_when_the_server_hangs_up_before_the_next_recipient_s_reply() {
        let (port, server) = server(&["PIPELINING"], false).await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut conn =
            Connection::open(tcp, &Session { tls: None, hello: "client.test", credentials: None }).await.unwrap();
        let to = ["refused-then-gone@example.jp", "taro@example.jp"].map(|a| a.parse().unwrap()).to_vec();
        let two = Envelope::new(Some("no-reply@example.jp".parse().unwrap()), to).unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(10), send_one(&mut conn, &two, b"x\r\n")).await;
        let refused = sent.expect("the client hung").unwrap_err();
        assert!(matches!(&refused, ClientError::Refused(Reply { code: 550, .. })), "{refused}");
        assert!(!conn.usable(), "the server is gone");
        let seen = server.await.unwrap();
        assert_eq!(seen.last().map(String::as_str), Some("RCPT TO:<refused-then-gone@example.jp>"), "{seen:?}");
    }

    #[tokio::test]
    async fn starttls_is_required_when_configured() {
        let (port, _server) = server(&["PIPELINING"], false).await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let roots = tokio_rustls::rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let config = Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
        let target = TlsTarget { config: &config, name: ServerName::try_from("mx.example.jp").unwrap() };
        let session = Session { tls: Some((TlsStart::Starttls, target)), hello: "client.test", credentials: None };
        let refused = Connection::open(tcp, &session).await.err().expect("no plaintext fallback");
        assert!(refused.to_string().contains("does not offer STARTTLS"), "{refused}");
    }

    #[tokio::test]
    async fn starttls_upgrades_the_session_before_ehlo_auth_and_the_mail() {
        let (sent, seen) = send_over_tls(TlsStart::Starttls, "localhost", Some((USER, PASSWORD))).await;
        sent.expect("sent over TLS");
        let tls = seen.iter().position(|l| l == "(TLS)").expect("the handshake happened");
        assert_eq!(&seen[..tls], ["EHLO client.test", "STARTTLS"], "nothing but EHLO in plaintext");
        assert_eq!(seen[tls + 1], "EHLO client.test", "greeted again over TLS");
        assert!(seen[tls + 2].starts_with("AUTH PLAIN "), "credentials only over TLS: {seen:?}");
        assert_eq!(seen.last().unwrap(), "Subject: hi\r\n\r\nover TLS\r\n.\r\n");
    }

    #[tokio::test]
    async fn implicit_tls_sends_the_mail_over_tls_from_the_start() {
        let (sent, seen) = send_over_tls(TlsStart::Implicit, "localhost", None).await;
        sent.expect("sent over TLS");
        assert_eq!(seen[0], "EHLO client.test");
        assert_eq!(seen.last().unwrap(), "Subject: hi\r\n\r\nover TLS\r\n.\r\n");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused_before_anything_is_sent() {
        for start in [TlsStart::Starttls, TlsStart::Implicit] {
            let (sent, seen) = send_over_tls(start, "other.example.jp", Some((USER, PASSWORD))).await;
            let refused = sent.expect_err("the name does not match");
            assert!(matches!(refused, ClientError::Tls(_)), "{start:?}: {refused}");
            assert!(!seen.iter().any(|l| l.starts_with("AUTH") || l.starts_with("MAIL")), "{start:?}: {seen:?}");
        }
    }

    #[test]
    fn lines_starting_with_a_dot_are_doubled_so_the_message_cannot_end_early() {
        let mut out = Vec::new();
        dot_stuff(b".first\r\nmid\r\n.\r\n..two\r\nlast", &mut out);
        assert_eq!(out, b"..first\r\nmid\r\n..\r\n...two\r\nlast\r\n.\r\n");
    }

    #[test]
    fn replies_are_read_by_rfc_5321_s_grammar() {
        assert_eq!(parse_line(b"250-PIPELINING"), Some((250, true, &b"PIPELINING"[..])));
        assert_eq!(parse_line(b"550 5.1.1 unknown"), Some((550, false, &b"5.1.1 unknown"[..])));
        assert_eq!(parse_line(b"354"), Some((354, false, &b""[..])));
        for bad in [&b"hello"[..], b"25", b"2500 x", b"650 x", b"25a x"] {
            assert_eq!(parse_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
