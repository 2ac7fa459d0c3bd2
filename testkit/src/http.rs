//! One HTTP/1.1 exchange with a settings site, as a browser without JavaScript makes it:
//! cookies in, `Set-Cookie` and `Location` out, and the form's CSRF field.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back: the status, the `Set-Cookie` name=value pairs, the `Location`, and
/// the body.
pub struct Answer {
    pub status: u16,
    pub cookies: Vec<(String, String)>,
    pub location: Option<String>,
    pub body: String,
}

impl Answer {
    /// The cookies it set, as a `Cookie` header's value.
    pub fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ")
    }

    /// The hidden CSRF field's value in the page.
    pub fn csrf(&self) -> String {
        const FIELD: &str = "name=\"csrf\" value=\"";
        let at = self.body.find(FIELD).unwrap_or_else(|| panic!("a CSRF field in {}", self.body)) + FIELD.len();
        self.body[at..].split('"').next().expect("its value").to_owned()
    }
}

/// `method path` on `addr` with `cookies` (a `Cookie` header's value) and, for a POST,
/// an urlencoded `form`; the connection is closed after the answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, cookies: &str, form: Option<&str>) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = form.unwrap_or("");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nCookie: {cookies}\r\n");
    if form.is_some() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let header = |line: &str, name: &str| {
        line.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned())
    };
    let cookies = head
        .lines()
        .filter_map(|l| header(l, "set-cookie"))
        .filter_map(|c| c.split(';').next()?.split_once('=').map(|(n, v)| (n.to_owned(), v.to_owned())))
        .collect();
    let location = head.lines().find_map(|l| header(l, "location"));
    Answer { status, cookies, location, body: body.to_owned() }
}
