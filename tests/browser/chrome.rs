//! A headless Chromium driven over WebDriver: chromedriver as a child process on a
//! free port, and [`Browser`], the few things a test does on a page (fill, click,
//! read, screenshot) with the page's title checked after each navigation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

use super::WAIT;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Every page's `<title>` ends with this (admin/src/site/html.rs).
const TITLE_SUFFIX: &str = " | ひかり電話設定サイト";

/// chromedriver, running until dropped; owns Chromium's profile directory.
pub struct Chromedriver {
    child: Child,
    addr: SocketAddr,
    profile: tempfile::TempDir,
}

impl Chromedriver {
    /// Starts chromedriver on a free loopback port and waits until it is ready. Panics
    /// (the test fails, never skips) if Chromium or chromedriver is not installed.
    pub fn start(log: &Path) -> Self {
        for binary in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the browser test needs Debian's chromium and chromium-driver; \
                 run `bash scripts/setup.sh` (as root) first"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            profile: tempfile::tempdir().expect("profile dir"),
        };
        driver.wait_ready();
        driver
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while !get(self.addr, "/status").is_some_and(|body| body.contains("\"ready\":true")) {
            assert!(Instant::now() < deadline, "chromedriver did not answer on {} (log: see above)", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a Chromium session: headless, no sandbox (root in a container), nothing
    /// fetched from the network on its own, a fresh profile, a phone's width (headless
    /// Chromium renders at least 500 px) and a height that fits the longest page in one
    /// screenshot.
    pub async fn browser(&self, shots: PathBuf) -> Browser {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=412,2800",
            "--lang=ja",
        ]
        .map(str::to_owned);
        let profile = format!("--user-data-dir={}", self.profile.path().display());
        let args = [args.as_slice(), &[profile]].concat();
        let options = serde_json::json!({ "binary": CHROMIUM, "args": args });
        let capabilities = serde_json::Map::from_iter([("goog:chromeOptions".to_owned(), options)]);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://{}", self.addr))
            .await
            .expect("a Chromium session");
        Browser { client, shots, taken: 0 }
    }
}

impl Drop for Chromedriver {
    /// Asks chromedriver to quit its browsers and exit; kills it if it does not.
    fn drop(&mut self) {
        let _ = get(self.addr, "/shutdown");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` from chromedriver; the body, or `None` while it is not listening.
/// chromedriver keeps the connection open despite `Connection: close`, so the body is
/// read by its `Content-Length`.
fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if n == 0 || length.is_some_and(|length| body.len() >= length) {
                return Some(body.to_owned());
            }
        } else if n == 0 {
            return None;
        }
    }
}

/// One browser session on the site, numbering its screenshots.
pub struct Browser {
    pub client: Client,
    shots: PathBuf,
    taken: usize,
}

impl Browser {
    /// Opens `url` and checks the page that comes up.
    pub async fn open(&mut self, url: &str, title: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
        self.expect_page(title).await;
    }

    /// Waits until the page titled `title` (its `<h1>`, too) is shown, then saves a
    /// screenshot `NN-<shot>.png`: the record of what the subscriber saw.
    pub async fn expect_page(&mut self, title: &str) {
        let want = format!("{title}{TITLE_SUFFIX}");
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.client.title().await.expect("title");
            if seen == want {
                break;
            }
            assert!(Instant::now() < deadline, "expected the page {want:?}, the browser shows {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.text("h1").await, title);
    }

    /// Saves a screenshot of the viewport as `NN-<name>.png`.
    pub async fn shot(&mut self, name: &str) {
        self.assert_accessible(name).await;
        self.taken += 1;
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{:02}-{name}.png", self.taken));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Runs axe-core (installed by scripts/setup.sh) in the page shown and fails on any
    /// violation of serious or critical impact: labels, contrast, names, structure.
    pub async fn assert_accessible(&self, page: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/axe/node_modules/axe-core/axe.min.js");
        let axe = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; install it with `bash scripts/setup.sh`", path.display()));
        let script = format!(
            "{axe}\nconst done = arguments[arguments.length - 1];\n\
             axe.run(document, {{ resultTypes: ['violations'] }}).then(r => done(r.violations\n\
               .filter(v => v.impact === 'serious' || v.impact === 'critical')\n\
               .map(v => v.impact + ' ' + v.id + ': ' + v.help + ' at ' + v.nodes.map(n => n.target.join(' ')).join(', '))));"
        );
        let found = self.client.execute_async(&script, Vec::new()).await.expect("axe runs in the page");
        let found: Vec<String> = serde_json::from_value(found).expect("a list of violations");
        assert!(found.is_empty(), "{page}: accessibility violations (axe-core):\n{}", found.join("\n"));
    }

    /// The path of the page shown.
    pub async fn path(&self) -> String {
        self.client.current_url().await.expect("url").path().to_owned()
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    /// The visible text of the whole page.
    pub async fn body(&self) -> String {
        self.text("body").await
    }

    /// Replaces the text of the field named `name`, typing as a subscriber does.
    pub async fn fill(&self, name: &str, text: &str) {
        let field = self.find(&format!("[name=\"{name}\"]")).await;
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    /// The current text of the field named `name`.
    pub async fn value(&self, name: &str) -> String {
        self.find(&format!("[name=\"{name}\"]")).await.prop("value").await.expect("value").unwrap_or_default()
    }

    /// Whether the checkbox or radio button matching `css` is checked.
    pub async fn checked(&self, css: &str) -> bool {
        self.find(css).await.is_selected().await.expect("selected")
    }

    /// Sets the checkbox named `name` to `on` by clicking it if needed.
    pub async fn check(&self, name: &str, on: bool) {
        let css = format!("input[type=\"checkbox\"][name=\"{name}\"]");
        if self.checked(&css).await != on {
            self.find(&css).await.click().await.expect("click");
        }
        assert_eq!(self.checked(&css).await, on, "{name}");
    }

    /// Follows the link whose text is `text`.
    pub async fn click_link(&self, text: &str) {
        let link = self.client.find(Locator::LinkText(text)).await.unwrap_or_else(|e| panic!("no link {text}: {e}"));
        link.click().await.unwrap_or_else(|e| panic!("click {text}: {e}"));
    }

    /// Waits until the element matching `css` shows text containing `needle`: the answer
    /// to a form posted back to the same page.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                let text = element.text().await.unwrap_or_default();
                if text.contains(needle) {
                    return text;
                }
            }
            assert!(Instant::now() < deadline, "{css} never showed {needle:?}; the page says:\n{}", self.body().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element matching `css` (a link or a button).
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Ends the WebDriver session, closing Chromium.
    pub async fn close(self) {
        self.client.close().await.expect("close the session");
    }
}
