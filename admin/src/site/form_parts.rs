//! The parts of a settings form that 着信お知らせメール ([`super::settings_form`]) and
//! FAXお知らせメール ([`super::fax_settings`]) share: 開始/停止 (R-N1) and the
//! 送信先メールアドレス rows (R-N2, R-N3) with their 送信 checks and 送信テスト buttons,
//! read from the submitted fields, checked, and rendered.
//!
//! Rows are fixed: [`MAX_DESTINATIONS`] address rows read by index, so a sixth address
//! cannot be submitted at all. Blank rows are ignored.

use std::collections::HashMap;

use engine::address::{AddressError, DestinationAddress};
use engine::phone::PhoneNumber;
use engine::store::{Destination, MAX_DESTINATIONS};

use super::html;

/// One row as entered: the text and its check (送信 or 指定).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub text: String,
    pub checked: bool,
}

/// A choice with a value the settings form does not offer (`enabled=maybe`).
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: not a value this form offers ({})", allowed.join(", "))]
pub struct ChoiceError {
    name: String,
    value: String,
    allowed: &'static [&'static str],
}

/// The stored destinations as the form's [`MAX_DESTINATIONS`] rows.
pub fn destination_rows(destinations: &[Destination]) -> Vec<Row> {
    let mut rows: Vec<Row> = destinations
        .iter()
        .take(MAX_DESTINATIONS)
        .map(|d| Row { text: d.address.as_str().to_owned(), checked: d.send })
        .collect();
    rows.resize(MAX_DESTINATIONS, Row::default());
    rows
}

/// A submitted form's destination rows (`dest_{i}`, `send_{i}`), trimmed; a sixth row
/// is not read.
pub fn destination_rows_from_fields(fields: &HashMap<String, String>) -> Vec<Row> {
    (0..MAX_DESTINATIONS)
        .map(|i| Row {
            text: field_text(fields, &format!("dest_{i}")),
            checked: field_checked(fields, &format!("send_{i}")),
        })
        .collect()
}

/// A text field as submitted, trimmed; empty when absent.
pub fn field_text(fields: &HashMap<String, String>, name: &str) -> String {
    fields.get(name).map(|v| v.trim().to_owned()).unwrap_or_default()
}

/// Whether a checkbox was submitted checked.
pub fn field_checked(fields: &HashMap<String, String>, name: &str) -> bool {
    fields.get(name).is_some_and(|v| !v.is_empty())
}

/// The destinations of the rows not blank (R-N2), each checked by R-N3; a row that does
/// not parse, or repeats an earlier address, gets its message in `errors` instead.
pub fn parse_destinations(rows: &[Row], errors: &mut HashMap<usize, String>) -> Vec<Destination> {
    let mut destinations = Vec::new();
    for (i, row) in rows.iter().enumerate().filter(|(_, row)| !row.text.is_empty()) {
        match DestinationAddress::parse(&row.text) {
            // One mailbox however its letters are cased (as the engine counts it).
            Ok(address)
                if destinations
                    .iter()
                    .any(|d: &Destination| d.address.as_str().eq_ignore_ascii_case(address.as_str())) =>
            {
                errors.insert(i, "同じメールアドレスがすでに入力されています。".to_owned());
            }
            Ok(address) => destinations.push(Destination { address, send: row.checked }),
            Err(error) => {
                errors.insert(i, address_message(&error));
            }
        }
    }
    destinations
}

/// Whether every choice of a settings form has a value the form offers: 開始/停止
/// (`enabled`) is `on` or `off`, a check (the fields `is_check` names) is `on` or absent.
/// A browser sends nothing else; anything else is refused rather than read as 停止
/// (`enabled=maybe` was saved as 停止).
pub fn check_form_choices(
    fields: &HashMap<String, String>,
    is_check: impl Fn(&str) -> bool,
) -> Result<(), ChoiceError> {
    for (name, value) in fields {
        let allowed: &'static [&'static str] = match name.as_str() {
            "enabled" => &["on", "off"],
            _ if is_check(name) => &["on"],
            _ => continue,
        };
        if !allowed.contains(&value.as_str()) {
            return Err(ChoiceError { name: name.clone(), value: value.clone(), allowed });
        }
    }
    Ok(())
}

/// R-N3's refusals, in the subscriber's words.
pub fn address_message(error: &AddressError) -> String {
    match error {
        AddressError::NotHalfWidth(c) => format!(
            "全角文字など使えない文字「{c}」があります。メールアドレスは半角英数字と記号（@ を含む）で入力してください。"
        ),
        AddressError::AtCount => "メールアドレスには「@」を1つだけ入力してください。".to_owned(),
        AddressError::AtAtEdge => "「@」の前と後ろの両方に文字を入力してください。".to_owned(),
        AddressError::LocalChar(c) => format!(
            "「@」より前に使えない文字「{c}」があります。使える文字は半角英数字と _ . - ! $ % ' * + / ? ^ # です。"
        ),
        AddressError::DomainChar(c) => {
            format!("「@」より後ろに使えない文字「{c}」があります。使える文字は半角英数字と - . です。")
        }
        AddressError::DomainEndsWithDot => "メールアドレスの最後を「.」にすることはできません。".to_owned(),
        AddressError::TooLong(n) => {
            format!("メールアドレスは{}文字以内で入力してください（{n}文字あります）。", engine::address::MAX_LEN)
        }
        AddressError::LocalTooLong(n) => {
            format!("「@」より前は{}文字以内で入力してください（{n}文字あります）。", engine::address::MAX_LOCAL_LEN)
        }
    }
}

/// ` checked` for a checked box or radio button.
pub fn check_attr(checked: bool) -> &'static str {
    if checked {
        " checked"
    } else {
        ""
    }
}

/// A phone number as typed (at login, in the designated numbers), read as R-L2 has it:
/// hyphens, spaces and full-width digits (a Japanese input method's) are what people type,
/// and were refused.
pub fn typed_number(typed: &str) -> Result<PhoneNumber, engine::phone::PhoneNumberError> {
    let digits: String = typed
        .chars()
        .filter(|c| !matches!(c, ' ' | '\u{3000}' | '-' | '\u{2010}' | '\u{2212}' | '\u{30FC}' | '\u{FF0D}'))
        .map(|c| match c {
            '０'..='９' => char::from(b'0' + (c as u32 - '０' as u32) as u8),
            c => c,
        })
        .collect();
    PhoneNumber::parse(&digits)
}

/// A row's error beside it, announced to screen readers.
pub fn row_error(message: Option<&String>) -> String {
    message.map(|m| format!(" <strong class=\"error\" role=\"alert\">{}</strong>", html::escape(m))).unwrap_or_default()
}

/// The path a destination row's 送信テスト button posts the form to (R-N2).
pub fn test_mail_path(action: &str, row: usize) -> String {
    format!("{action}/test/{row}")
}

/// A settings form's opening: the form, its CSRF token, and the version it is rendered
/// from (R-S9).
///
/// A copy of the 設定 button comes first: pressing Enter in a field activates the form's
/// first submit button, which must save, not send a test mail. It is laid out off-screen
/// (`default-submit`), not `hidden`: WebKit before 2022 (an older iPhone's browsers)
/// passes over a button that is not rendered, to 送信テスト of destination 1.
pub fn form_start(action: &str, csrf: &str, version: Option<u64>) -> String {
    let version = version.map(|v| v.to_string()).unwrap_or_default();
    format!(
        "<form method=\"post\" action=\"{}\">\n{}\
         <button type=\"submit\" class=\"default-submit\" tabindex=\"-1\" aria-hidden=\"true\">設定</button>\n\
         <input type=\"hidden\" name=\"version\" value=\"{}\">\n",
        html::escape(action),
        html::csrf_field(csrf),
        html::escape(&version),
    )
}

/// 開始/停止 (R-N1).
pub fn enabled_fieldset(enabled: bool) -> String {
    format!(
        "<fieldset>\n<legend>開始/停止</legend>\n\
         <label><input type=\"radio\" name=\"enabled\" value=\"on\"{on}> 開始</label>\n\
         <label><input type=\"radio\" name=\"enabled\" value=\"off\"{off}> 停止</label>\n</fieldset>\n",
        on = check_attr(enabled),
        off = check_attr(!enabled),
    )
}

/// The 現在のパスワード field of a settings form: its `maxlength`, and why the password
/// given was refused, said beside it.
#[derive(Debug, Clone, Copy)]
pub struct CurrentPassword {
    pub max: usize,
    pub refused: Option<&'static str>,
}

/// 送信先メールアドレス設定 (R-N2, R-N3): the rows, each with its 送信 check, its
/// 送信テスト button posting the same form to [`test_mail_path`] (`formaction` works
/// without JavaScript) and its error, then the current password a change needs.
pub fn destinations_fieldset(
    action: &str,
    rows: &[Row],
    errors: &HashMap<usize, String>,
    password: CurrentPassword,
) -> String {
    let mut out = "<fieldset>\n<legend>送信先メールアドレス設定</legend>\n\
            <p><small>最大5件。「送信」にチェックしたアドレスにのみお知らせします。\
            「送信テスト」で、入力したアドレスにテストメールを送信できます（設定は保存されません）。</small></p>\n\
            <p><small>アドレスを登録するときは、必ず「送信テスト」でメールが届くことを確かめてください。\
            誤ったアドレスを登録すると、第三者に着信情報が通知されるおそれがあります。\
            携帯電話などで迷惑メールの受信拒否を設定している場合は、テストメールの差出人のアドレスからの\
            メールを受信できるように設定してください。</small></p>\n"
        .to_owned();
    for (i, row) in rows.iter().enumerate() {
        out += &format!(
            "<p><label for=\"dest_{i}\">送信先{n}</label>\n\
             <input id=\"dest_{i}\" name=\"dest_{i}\" type=\"text\" inputmode=\"email\" \
             autocomplete=\"email\" value=\"{text}\" maxlength=\"256\">\n\
             <label><input type=\"checkbox\" name=\"send_{i}\" value=\"on\"{checked} \
             aria-label=\"送信先{n}に送信\"> 送信</label>\n\
             <button type=\"submit\" formaction=\"{test}\" aria-label=\"送信先{n}に送信テスト\">送信テスト</button>\
             {error}</p>\n",
            n = i + 1,
            text = html::escape(&row.text),
            checked = check_attr(row.checked),
            test = html::escape(&test_mail_path(action, i)),
            error = row_error(errors.get(&i)),
        );
    }
    // Said beside the field (the form's end, far from the page's top on a phone), the
    // field marked and described by it for a screen reader; the page's top says it too.
    let (marked, refused) = match password.refused {
        Some(why) => (
            " aria-invalid=\"true\" aria-describedby=\"current-error\"",
            format!("<strong class=\"error\" id=\"current-error\">{}</strong><br>\n", html::escape(why)),
        ),
        None => ("", String::new()),
    };
    out += &format!(
        "<p><label for=\"current\">現在のパスワード</label><br>\n\
         <input id=\"current\" name=\"current\" type=\"password\" autocomplete=\"current-password\" \
         maxlength=\"{max}\"{marked}><br>\n{refused}\
         <small>送信先メールアドレスや「送信」のチェックを変更するときに入力してください。</small></p>\n</fieldset>\n",
        max = password.max,
    );
    out
}
