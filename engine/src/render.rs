//! Render stage: the notification mail for one call and one recipient (R-M1, R-M2).
//!
//! The mail is Japanese plain text in UTF-8; lettre encodes the subject (RFC 2047) and
//! the body (base64 where needed). The Message-ID depends only on the call id, the
//! called number and the recipient, so a replayed CDR renders the very same mail and a
//! receiver (or the load tester) can recognise a duplicate.

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, FixedOffset, Utc};
use lettre::address::{Address, Envelope};
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message};

use crate::address::DestinationAddress;
use crate::decode::{CallEvent, Caller};

/// A rendered mail, ready for the deliver stage.
#[derive(Debug, Clone)]
pub struct Mail {
    /// `<…@domain>`, stable across replays of the same CDR.
    pub message_id: String,
    pub recipient: DestinationAddress,
    pub envelope: Envelope,
    /// The whole message as sent on the wire (headers and body).
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot build the mail: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("cannot address the mail: {0}")]
    Envelope(#[from] lettre::address::AddressError),
}

/// Renders mails from a fixed no-reply sender (R-M1).
#[derive(Debug, Clone)]
pub struct Renderer {
    from: Mailbox,
    /// Right-hand side of every Message-ID: the sender's domain.
    domain: String,
}

/// 日本時間 (Japan Standard Time), in which every time in a mail is shown (R-M2).
pub fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).expect("+09:00 is a valid offset")
}

impl Renderer {
    pub fn new(from: Mailbox) -> Self {
        let domain = from.email.domain().to_owned();
        Self { from, domain }
    }

    pub fn from(&self) -> &Mailbox {
        &self.from
    }

    /// The notification of `call` for `recipient`.
    pub fn render(&self, call: &CallEvent<'_>, recipient: &DestinationAddress) -> Result<Mail, RenderError> {
        let caller = caller_text(&call.caller);
        let answered = if call.is_missed() { "応答なし" } else { "応答あり" };
        let subject = format!("【着信お知らせ】{caller}から{}への着信（{answered}）", call.called);
        let mut body = String::with_capacity(512);
        let _ = write!(
            body,
            "着信お知らせメールです。次の着信がありました。\r\n\r\n\
             着信番号：{called}\r\n\
             発信者番号：{caller}\r\n\
             着信日時：{time}（日本時間）\r\n\
             応答：{answer}\r\n\r\n\
             このメールは送信専用のアドレスから送信しています。返信されてもお答えできません。\r\n\
             送信先や送信条件の変更は設定サイトで行えます。\r\n",
            called = call.called,
            time = format_jst(call.started_at),
            answer = if call.is_missed() { "応答できませんでした" } else { "応答しました" },
        );
        self.build(
            recipient,
            subject,
            body,
            message_id(&call.called.to_string(), &call.call_id, recipient, &self.domain),
        )
    }

    /// The 送信テスト mail (R-N2): lets a subscriber check an address before saving it.
    pub fn render_test(&self, number: &str, recipient: &DestinationAddress, nonce: &str) -> Result<Mail, RenderError> {
        let subject = "【着信お知らせ】送信テスト".to_owned();
        let body = format!(
            "着信お知らせメールの送信テストです。\r\n\r\n\
             電話番号 {number} の送信先として、このアドレスにメールが届くことを確認できました。\r\n\
             設定サイトで「送信」にチェックを入れて設定すると、着信のお知らせが届きます。\r\n\
             お心当たりのない場合は、このメールを破棄してください。\r\n"
        );
        self.build(recipient, subject, body, message_id(number, nonce, recipient, &self.domain))
    }

    fn build(
        &self,
        recipient: &DestinationAddress,
        subject: String,
        body: String,
        message_id: String,
    ) -> Result<Mail, RenderError> {
        let to = recipient_address(recipient);
        let message = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.clone()))
            .subject(subject)
            .message_id(Some(message_id.clone()))
            .raw_header(HeaderValue::new(HeaderName::new_from_ascii_str("Auto-Submitted"), "auto-generated".into()))
            .header(ContentType::TEXT_PLAIN)
            .body(body)?;
        let envelope = Envelope::new(Some(self.from.email.clone()), vec![to])?;
        Ok(Mail { message_id, recipient: recipient.clone(), envelope, bytes: message.formatted() })
    }
}

/// 発信者番号 as shown to the subscriber (R-M2, R-N7).
pub fn caller_text(caller: &Caller) -> std::borrow::Cow<'static, str> {
    match caller {
        Caller::Number(n) => n.to_string().into(),
        Caller::Withheld => "非通知".into(),
        Caller::Unavailable => "表示圏外".into(),
        Caller::Payphone => "公衆電話".into(),
    }
}

/// `2026年11月24日(火) 10:00:00` in Japan time.
pub fn format_jst(t: DateTime<Utc>) -> String {
    const WEEKDAYS: [&str; 7] = ["月", "火", "水", "木", "金", "土", "日"];
    let local = t.with_timezone(&jst());
    let weekday = WEEKDAYS[local.weekday().num_days_from_monday() as usize];
    format!("{}({weekday}) {}", local.format("%Y年%m月%d日"), local.format("%H:%M:%S"))
}

/// R-N3 admits local parts that RFC 5322 does not (`a..b.@`, as some Japanese carriers
/// issued); they are sent as typed, since the subscriber's mail server accepts them.
fn recipient_address(recipient: &DestinationAddress) -> Address {
    let (user, domain) = recipient.as_str().split_once('@').expect("R-N3 addresses have one @");
    Address::new(user, domain).unwrap_or_else(|_| Address::new_dangerous(user, domain))
}

/// `<32 hex digits@domain>` from the call, number and recipient: the same inputs give
/// the same id in every process (FNV-1a, 128 bit; not for security, only identity).
pub fn message_id(number: &str, call_id: &str, recipient: &DestinationAddress, domain: &str) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let mut hash = OFFSET;
    for part in [number.as_bytes(), call_id.as_bytes(), recipient.as_str().as_bytes()] {
        for &b in part.iter().chain(&[0u8]) {
            hash ^= u128::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    format!("<{hash:032x}@{domain}>")
}
