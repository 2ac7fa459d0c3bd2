//! Render stage: the notification mail for one call and one recipient (R-M1, R-M2).
//!
//! The mail is Japanese plain text in UTF-8, written by hand: the subject in RFC 2047
//! encoded words, the body in base64. The Message-ID depends only on the call id, the
//! called number and the recipient, so a replayed CDR renders the very same mail and a
//! receiver (or the load tester) can recognise a duplicate.

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Datelike, FixedOffset, Utc};
use lettre::address::{Address, Envelope};
use lettre::message::Mailbox;

use crate::address::DestinationAddress;
use crate::decode::{CallEvent, Caller};
use crate::phone::PhoneNumber;
use crate::store::FaxRecord;

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

/// Which service a mail belongs to (R-C1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailService {
    /// 着信お知らせメール.
    Call,
    /// FAXお知らせメール (R-F1).
    Fax,
}

/// The call (or fax) a mail is about: for the dead-letter record, the latency metric,
/// and a queued mail's check against its number's settings.
#[derive(Debug, Clone)]
pub struct Origin {
    pub call_id: String,
    pub called: PhoneNumber,
    /// The call's end: where the end-to-end latency measurement starts.
    pub ended_at: DateTime<Utc>,
    /// The CDR partition it was read from (`None`: not read from Kafka, e.g. a replay).
    pub source: Option<crate::store::PartitionId>,
}

impl Origin {
    /// The service its mails belong to. (No CDR's call id starts with
    /// [`crate::decode::FAX_NOTIFICATION`]: decode refuses one.)
    pub(crate) fn service(&self) -> MailService {
        if self.call_id.starts_with(crate::decode::FAX_NOTIFICATION) {
            MailService::Fax
        } else {
            MailService::Call
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot address the mail: {0}")]
    Envelope(#[from] lettre::error::Error),
}

/// The fax's PDF in its mails (「FAXをPDFで添付する」, docs/fax.md).
#[derive(Debug, Clone, Copy)]
pub enum FaxPdf<'a> {
    /// The number does not ask for it.
    NotAsked,
    Attached(&'a [u8]),
    /// Larger than a mail carries ([`crate::fax::ATTACHED_PDF_AT_MOST`]): the mail says
    /// so and has the link only.
    TooLarge,
    /// The document makes no PDF (not expected: decode checked it).
    Unavailable,
}

/// Renders mails from a fixed no-reply sender (R-M1).
#[derive(Debug, Clone)]
pub struct Renderer {
    from: Mailbox,
    /// The `From:` header line, encoded once.
    from_header: String,
    /// The same for fax mails: the sender's name says FAXお知らせメール (R-C1), the
    /// address is the same.
    fax_from_header: String,
    /// Right-hand side of every Message-ID: the sender's domain.
    domain: String,
    /// The settings site as subscribers reach it (`admin.public_url`): fax mails link
    /// there.
    site: std::sync::Arc<str>,
}

/// 日本時間 (Japan Standard Time), in which every time in a mail is shown (R-M2).
pub fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).expect("+09:00 is a valid offset")
}

impl Renderer {
    pub fn new(from: Mailbox) -> Self {
        let domain = from.email.domain().to_owned();
        let fax_from = Mailbox { name: from.name.as_deref().map(fax_sender_name), ..from.clone() };
        Self {
            from_header: from_header(&from),
            fax_from_header: from_header(&fax_from),
            from,
            domain,
            site: "http://127.0.0.1:8080".into(),
        }
    }

    /// Fax mails link to the fax on the site at `url` (`admin.public_url`).
    pub fn with_site(self, url: &str) -> Self {
        Self { site: url.trim_end_matches('/').into(), ..self }
    }

    /// The address of the fax under `key` on the site.
    pub fn fax_link(&self, key: &str) -> String {
        format!("{}/fax/{key}", self.site)
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
            call_message_id(call.called.as_str(), &call.call_id, call.ended_at, recipient, &self.domain),
        )
    }

    /// The 送信テスト mail (R-N2) of `service`: lets a subscriber check an address
    /// before saving it.
    pub fn render_test(
        &self,
        number: &str,
        recipient: &DestinationAddress,
        nonce: &str,
        service: MailService,
    ) -> Result<Mail, RenderError> {
        let (subject, name, what) = match service {
            MailService::Call => ("【着信お知らせ】送信テスト", "着信お知らせメール", "着信"),
            MailService::Fax => ("【FAXお知らせ】送信テスト", "FAXお知らせメール", "FAXの受信"),
        };
        let subject = subject.to_owned();
        let body = format!(
            "{name}の送信テストです。\r\n\r\n\
             電話番号 {number} の送信先として、このアドレスにメールが届くことを確認できました。\r\n\
             設定サイトで「送信」にチェックを入れて設定すると、{what}のお知らせが届きます。\r\n\
             お心当たりのない場合は、このメールを破棄してください。\r\n"
        );
        let id = message_id(number, nonce, recipient, &self.domain);
        self.build_with(self.sender_header(service), recipient, subject, body, id, None)
    }

    /// The `From:` header of `service`'s mails: one address, named for the service.
    fn sender_header(&self, service: MailService) -> &str {
        match service {
            MailService::Call => &self.from_header,
            MailService::Fax => &self.fax_from_header,
        }
    }

    /// The notification of a received fax for `recipient` (R-F1, R-M1): who sent it,
    /// when, how many pages, and the link to it on the site; the fax attached as a PDF
    /// when its number asks for it and it could be, else said why not.
    pub fn render_fax(
        &self,
        fax: &FaxRecord,
        recipient: &DestinationAddress,
        pdf: FaxPdf<'_>,
    ) -> Result<Mail, RenderError> {
        let subject = format!("【FAXお知らせ】{}から{}へのFAX（{}枚）", fax.sender, fax.number, fax.pages);
        let mut body = String::with_capacity(768);
        let _ = write!(
            body,
            "FAXお知らせメールです。次のFAXを受信しました。\r\n\r\n\
             受信番号：{number}\r\n\
             送信元：{sender}\r\n\
             受信日時：{time}（日本時間）\r\n\
             枚数：{pages}枚\r\n\r\n\
             FAXは設定サイトでご覧いただけます（ログインが必要です）。\r\n\
             {link}\r\n\r\n",
            number = fax.number,
            sender = fax.sender,
            time = format_jst(fax.received_at),
            pages = fax.pages,
            link = self.fax_link(&fax.key()),
        );
        match pdf {
            FaxPdf::NotAsked => {}
            FaxPdf::Attached(_) => body.push_str("このメールにFAXをPDFで添付しています。\r\n"),
            FaxPdf::TooLarge => {
                body.push_str("FAXのPDFは大きいため、このメールには添付していません。上のリンクからご覧ください。\r\n")
            }
            FaxPdf::Unavailable => body.push_str(
                "このFAXはPDFにできないため、このメールには添付していません。上のリンクからご覧ください。\r\n",
            ),
        }
        body.push_str(
            "このメールは送信専用のアドレスから送信しています。返信されてもお答えできません。\r\n\
             送信先の変更は設定サイトで行えます。\r\n",
        );
        let id = fax_message_id(&fax.number, fax.received_at, &fax.fax_id, recipient, &self.domain);
        let name = format!("fax-{}-{}.pdf", fax.number, fax.received_at.with_timezone(&jst()).format("%Y%m%d-%H%M%S"));
        let pdf = match pdf {
            FaxPdf::Attached(bytes) => Some(bytes),
            _ => None,
        };
        let from = self.sender_header(MailService::Fax);
        self.build_with(from, recipient, subject, body, id, pdf.map(|bytes| (name.as_str(), bytes)))
    }

    /// Writes the message by hand: lettre's builder costs several times the rest of the
    /// pipeline per mail, and these mails have one fixed shape. The result is plain
    /// RFC 5322 + MIME: every header 7-bit, the subject in RFC 2047 encoded words, the
    /// body base64 in 76-character lines.
    fn build(
        &self,
        recipient: &DestinationAddress,
        subject: String,
        body: String,
        message_id: String,
    ) -> Result<Mail, RenderError> {
        self.build_with(self.sender_header(MailService::Call), recipient, subject, body, message_id, None)
    }

    /// [`Renderer::build`], with a PDF `(file name, bytes)` attached when given: then
    /// multipart/mixed, the text first.
    fn build_with(
        &self,
        from_header: &str,
        recipient: &DestinationAddress,
        subject: String,
        body: String,
        message_id: String,
        attachment: Option<(&str, &[u8])>,
    ) -> Result<Mail, RenderError> {
        let to = recipient_address(recipient);
        let mut text = String::with_capacity(512 + body.len() * 4 / 3);
        text.push_str(from_header);
        text.push_str("To: ");
        text.push_str(recipient.as_str());
        text.push_str("\r\nSubject: ");
        encoded_words(&subject, &mut text);
        let _ = write!(
            text,
            "\r\nMessage-ID: {message_id}\r\nDate: {}\r\nAuto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n",
            Utc::now().to_rfc2822()
        );
        let plain = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n";
        match attachment {
            None => {
                text.push_str(plain);
                base64_lines(body.as_bytes(), &mut text);
            }
            Some((name, bytes)) => {
                // No base64 line can contain it: `=` and `_` are not base64 characters.
                let boundary = "=_callnotify_part_=";
                let _ = write!(
                    text,
                    "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n{plain}"
                );
                base64_lines(body.as_bytes(), &mut text);
                let _ = write!(
                    text,
                    "--{boundary}\r\nContent-Type: application/pdf; name=\"{name}\"\r\n\
                     Content-Disposition: attachment; filename=\"{name}\"\r\n\
                     Content-Transfer-Encoding: base64\r\n\r\n"
                );
                base64_lines(bytes, &mut text);
                let _ = write!(text, "--{boundary}--\r\n");
            }
        }
        let envelope = Envelope::new(Some(self.from.email.clone()), vec![to])?;
        Ok(Mail { message_id, recipient: recipient.clone(), envelope, bytes: text.into_bytes() })
    }
}

/// The sender's name of fax mails: `smtp.from`'s with 着信お知らせメール, where it says
/// so, for FAXお知らせメール (`NTT 着信お知らせメール` → `NTT FAXお知らせメール`).
fn fax_sender_name(call_name: &str) -> String {
    call_name.replace("着信お知らせメール", "FAXお知らせメール")
}

/// `From: =?utf-8?b?…?= <addr>\r\n`, written once per renderer.
fn from_header(from: &Mailbox) -> String {
    let mut header = String::from("From: ");
    if let Some(name) = from.name.as_deref().filter(|n| !n.is_empty()) {
        encoded_words(name, &mut header);
        // Folded, so a long name and address still fit in 78 characters.
        header.push_str("\r\n ");
    }
    let _ = write!(header, "<{}>\r\n", from.email);
    header
}

/// RFC 2047 "B" encoded words, folded onto continuation lines. Each word holds at most
/// 36 bytes of UTF-8, cut at character boundaries, so every line stays under 78
/// characters and no character is split between words.
fn encoded_words(text: &str, out: &mut String) {
    const WORD_BYTES: usize = 36;
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        let mut cut = rest.len().min(WORD_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if !first {
            out.push_str("\r\n ");
        }
        out.push_str("=?utf-8?b?");
        BASE64.encode_string(&rest.as_bytes()[..cut], out);
        out.push_str("?=");
        rest = &rest[cut..];
        first = false;
    }
}

/// Base64 in lines of 76 characters, each ended by CRLF (RFC 2045).
fn base64_lines(bytes: &[u8], out: &mut String) {
    for chunk in bytes.chunks(57) {
        BASE64.encode_string(chunk, out);
        out.push_str("\r\n");
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
pub(crate) fn recipient_address(recipient: &DestinationAddress) -> Address {
    let (user, domain) = recipient.as_str().split_once('@').expect("R-N3 addresses have one @");
    Address::new(user, domain).unwrap_or_else(|_| Address::new_dangerous(user, domain))
}

/// The Message-ID of the mail of fax `fax_id` to `number`, received at `received_at`,
/// for `recipient`: the fax as the site names it (number, reception, id), so two faxes
/// that share a fax_id (a server's counter reset) get two, which mailboxes would
/// otherwise take for one mail and drop the second. Tools that predict a fax's mails
/// (the load tester) use it too.
pub fn fax_message_id(
    number: &crate::phone::PhoneNumber,
    received_at: DateTime<Utc>,
    fax_id: &str,
    recipient: &DestinationAddress,
    domain: &str,
) -> String {
    let fax = crate::store::fax_key(number, received_at, fax_id);
    message_id(number.as_str(), &format!("fax:{fax}"), recipient, domain)
}

/// The Message-ID of the mail of a call record to `recipient`: one per record the
/// engine's dedup tells apart (number, call id, when it ended, in unix seconds), so the
/// CDRs of one call's ring-group legs, each mailed by its own outcome, are two mails to
/// a mail store, not one it drops as a repeat.
pub fn call_message_id(
    number: &str,
    call_id: &str,
    ended_at: DateTime<Utc>,
    recipient: &DestinationAddress,
    domain: &str,
) -> String {
    let ended = ended_at.timestamp().to_be_bytes();
    id_of([number.as_bytes(), call_id.as_bytes(), &ended, recipient.as_str().as_bytes()], domain)
}

/// `<32 hex digits@domain>` from the call, number and recipient: the same inputs give
/// the same id in every process (FNV-1a, 128 bit; not for security, only identity).
pub fn message_id(number: &str, call_id: &str, recipient: &DestinationAddress, domain: &str) -> String {
    id_of([number.as_bytes(), call_id.as_bytes(), recipient.as_str().as_bytes()], domain)
}

/// `<32 hex digits@domain>` from `parts` (FNV-1a, 128 bit, each part ended by a 0).
fn id_of<const N: usize>(parts: [&[u8]; N], domain: &str) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let mut hash = OFFSET;
    for part in parts {
        for &b in part.iter().chain(&[0u8]) {
            hash ^= u128::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    format!("<{hash:032x}@{domain}>")
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::decode::Outcome;
    use crate::phone::PhoneNumber;

    fn call(call_id: &str) -> CallEvent<'_> {
        let t = DateTime::parse_from_rfc3339("2026-11-24T10:00:00+09:00").unwrap().to_utc();
        CallEvent {
            call_id: Cow::Borrowed(call_id),
            called: PhoneNumber::parse("0312345678").unwrap(),
            caller: Caller::Number(PhoneNumber::parse("09011112222").unwrap()),
            started_at: t,
            answered_at: None,
            ended_at: t,
            outcome: Outcome::NoAnswer,
        }
    }

    fn renderer() -> Renderer {
        Renderer::new("着信お知らせメール <no-reply@notify.example.jp>".parse().unwrap())
    }

    #[test]
    fn r_m1_r_m2_the_mail_parses_back_to_its_japanese_text() {
        let to = DestinationAddress::parse("taro@example.jp").unwrap();
        let mail = renderer().render(&call("c-1"), &to).unwrap();
        let text = String::from_utf8(mail.bytes.clone()).unwrap();
        assert!(text.lines().all(|l| l.is_ascii() && l.len() <= 78), "7-bit, short lines:\n{text}");
        assert!(text.contains("\r\nMIME-Version: 1.0\r\n") && text.contains("\r\nAuto-Submitted: auto-generated\r\n"));
        let parsed = mail_parser::MessageParser::default().parse(&mail.bytes).unwrap();
        assert_eq!(parsed.subject(), Some("【着信お知らせ】09011112222から0312345678への着信（応答なし）"));
        let from = parsed.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("着信お知らせメール"));
        assert_eq!(from.address(), Some("no-reply@notify.example.jp"));
        let body = parsed.body_text(0).unwrap();
        assert!(body.contains("着信日時：2026年11月24日(火) 10:00:00（日本時間）"), "{body}");
        assert_eq!(parsed.message_id(), Some(mail.message_id.trim_matches(['<', '>'])));
    }

    /// R-M2: the CDRs of one call's ring-group legs (one call id, each leg ending at its
    /// own time, mailed by its own outcome) are two mails with two Message-IDs. They had
    /// one: a mail store dropping repeated ids kept only the first ("応答できませんでした"
    /// for a call the subscriber then answered on another phone).
    #[test]
    fn r_m2_two_records_of_one_call_ending_at_other_times_have_their_own_message_ids() {
        let to = DestinationAddress::parse("a@example.jp").unwrap();
        let leg = call("1795482000.18");
        let answered = CallEvent {
            answered_at: Some(leg.started_at),
            ended_at: leg.ended_at + chrono::TimeDelta::seconds(185),
            outcome: Outcome::Answered,
            ..leg.clone()
        };
        let ids = [&leg, &answered].map(|c| renderer().render(c, &to).unwrap().message_id);
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn the_message_id_depends_only_on_the_call_record_and_recipient() {
        let a = DestinationAddress::parse("a@example.jp").unwrap();
        let b = DestinationAddress::parse("b@example.jp").unwrap();
        let first = renderer().render(&call("c-1"), &a).unwrap().message_id;
        assert_eq!(renderer().render(&call("c-1"), &a).unwrap().message_id, first, "a replay renders the same id");
        assert_ne!(renderer().render(&call("c-2"), &a).unwrap().message_id, first);
        assert_ne!(renderer().render(&call("c-1"), &b).unwrap().message_id, first);
        assert!(first.ends_with("@notify.example.jp>"));
    }

    /// A one-page fax `job-1` to 0312345678, received at `at` (seconds since the epoch).
    fn fax_received_at(at: i64) -> FaxRecord {
        FaxRecord {
            number: PhoneNumber::parse("0312345678").unwrap(),
            fax_id: "job-1".into(),
            sender: "0612345678".into(),
            received_at: DateTime::from_timestamp(at, 0).unwrap(),
            pages: 1,
            kind: crate::fax::document::DocumentKind::Tiff,
            size: 10,
            read: false,
            deleted: false,
        }
    }

    /// R-F1: a fax's mail has a Message-ID of that fax: the same again when rendered again,
    /// another for another fax with the same fax_id (received at another time), which some
    /// mailboxes dropped as a duplicate of the first.
    #[test]
    fn r_f1_a_fax_mail_s_message_id_is_the_fax_s_even_when_fax_ids_repeat() {
        let to = DestinationAddress::parse("a@example.jp").unwrap();
        let id = |at| renderer().render_fax(&fax_received_at(at), &to, FaxPdf::NotAsked).unwrap().message_id;
        assert_eq!(id(1_764_000_000), id(1_764_000_000), "rendered again: the same");
        assert_ne!(id(1_764_000_000), id(1_764_086_400), "another fax with the same fax_id");
    }

    /// R-C1, R-M1: a fax mail comes from the same no-reply address, named for the service
    /// it is of: it said 着信お知らせメール.
    #[test]
    fn r_c1_r_m1_a_fax_mail_is_sent_in_the_fax_service_s_name() {
        let to = DestinationAddress::parse("a@example.jp").unwrap();
        let fax = fax_received_at(1_764_000_000);
        let fax_mail = renderer().render_fax(&fax, &to, FaxPdf::NotAsked).unwrap();
        let test_mail = renderer().render_test("0312345678", &to, "n-1", MailService::Fax).unwrap();
        for mail in [fax_mail, test_mail] {
            let parsed = mail_parser::MessageParser::default().parse(&mail.bytes).unwrap();
            let from = parsed.from().unwrap().first().unwrap();
            assert_eq!((from.name(), from.address()), (Some("FAXお知らせメール"), Some("no-reply@notify.example.jp")));
        }
    }

    /// R-F1: a fax mail carrying the largest PDF it may stays under 10 000 000 bytes, the
    /// "10 MB" of relays (Postfix's default is 10 240 000). At 7 MiB the mail was
    /// 10 044 000 bytes (base64 in lines of 76 with their line ends): such a relay
    /// refused it as too large (552), and the subscriber heard of the fax nowhere.
    #[test]
    fn r_f1_a_fax_mail_with_the_largest_attached_pdf_stays_under_ten_million_bytes() {
        let to = DestinationAddress::parse("a@example.jp").unwrap();
        let fax = fax_received_at(1_764_000_000);
        let pdf = vec![0xA5; crate::fax::ATTACHED_PDF_AT_MOST];
        let mail = renderer().render_fax(&fax, &to, FaxPdf::Attached(&pdf)).unwrap();
        assert!(mail.bytes.len() < 10_000_000, "{} bytes", mail.bytes.len());
    }

    #[test]
    fn encoded_words_never_split_a_character() {
        for text in ["あ".repeat(40), format!("a{}", "あ".repeat(40)), "ab".repeat(50)] {
            let mut out = String::new();
            encoded_words(&text, &mut out);
            let decoded: String = out
                .split("\r\n ")
                .map(|w| {
                    let b64 = w.strip_prefix("=?utf-8?b?").unwrap().strip_suffix("?=").unwrap();
                    String::from_utf8(BASE64.decode(b64).unwrap()).expect("each word is whole UTF-8")
                })
                .collect();
            assert_eq!(decoded, text);
        }
    }
}
