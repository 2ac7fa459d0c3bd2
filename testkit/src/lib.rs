//! What callnotify's tests and its load tester share, kept out of the product: the
//! engine never depends on this crate (only its tests do).
//!
//! - [`smtp`]: a small SMTP server speaking real SMTP, which can refuse, stall or hang.
//! - [`cdr`]: canonical CDRs of recent calls, as an exchange writes them.
//! - [`line`]: a subscriber's provisioning line.
//! - [`fax`]: fax records, as a fax server writes them.
//! - [`http`]: one HTTP/1.1 exchange with a settings site, cookies and CSRF field.
//! - [`wait`]: polling with a deadline that says what never happened.
//! - [`free_port`]: a loopback address nothing listens on.

pub mod cdr;
pub mod fax;
pub mod http;
pub mod line;
pub mod smtp;
pub mod wait;

use std::net::SocketAddr;

/// A loopback address with a port the kernel just handed out and nothing holds now.
pub fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A loopback port where a connection is refused at once, for as long as this lives:
/// a socket bound to it that never listens. A port merely freed ([`free_port`]) can be
/// taken meanwhile by a listener of a test running beside, which then answers.
pub struct ClosedPort {
    _bound: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

/// See [`ClosedPort`].
pub fn closed_port() -> std::io::Result<ClosedPort> {
    let bound = tokio::net::TcpSocket::new_v4()?;
    bound.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = bound.local_addr()?;
    Ok(ClosedPort { _bound: bound, addr })
}
