//! The 着信お知らせメール settings form (R-N1..R-N5): its fields as entered, their
//! parsing into [`CallSettings`] with messages per row, and its HTML.
//!
//! Rows are fixed: [`MAX_DESTINATIONS`] address rows and [`MAX_DESIGNATED`] number rows,
//! read by index, so a sixth address cannot be submitted at all. Blank rows are ignored.

use std::collections::HashMap;

use engine::address::{AddressError, DestinationAddress};
use engine::phone::{PhoneNumber, PhoneNumberError};
use engine::store::{CallSettings, Designated, Destination, MAX_DESIGNATED, MAX_DESTINATIONS};

use super::html;

/// Empty お知らせ対象電話番号 rows shown after the last one in use.
pub const EMPTY_DESIGNATED_ROWS: usize = 3;

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

/// The form's values as entered (or as stored, for a fresh page), so a refused form is
/// shown again with what the subscriber typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entered {
    /// 開始 / 停止 (R-N1).
    pub enabled: bool,
    /// 送信先メールアドレス rows (R-N2).
    pub destinations: Vec<Row>,
    /// 指定した電話番号からの着信のみ (R-N4).
    pub designated_only: bool,
    /// 応答できなかった着信のみ (R-N4).
    pub missed_only: bool,
    /// お知らせ対象電話番号 rows (R-N5).
    pub designated: Vec<Row>,
    /// The [`CallSettings::version`] the form was rendered from (R-S9); `None` when the
    /// submitted value is missing or garbled.
    pub version: Option<u64>,
}

/// Messages for the rows that did not parse, by row index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowErrors {
    pub destinations: HashMap<usize, String>,
    pub designated: HashMap<usize, String>,
}

impl RowErrors {
    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty() && self.designated.is_empty()
    }
}

/// The designated numbers in the rows they were entered in (R-N5's list keeps its
/// order and its gaps); one without a row, or whose row is taken or out of range,
/// goes to the first free row.
fn placed_rows(designated: &[Designated]) -> Vec<Row> {
    let mut rows = vec![Row::default(); MAX_DESIGNATED];
    let row = |d: &Designated| Row { text: d.number.as_str().to_owned(), checked: d.designate };
    let mut unplaced = Vec::new();
    for d in designated.iter().take(MAX_DESIGNATED) {
        match d.row.map(usize::from).filter(|&i| i < MAX_DESIGNATED && rows[i].text.is_empty()) {
            Some(i) => rows[i] = row(d),
            None => unplaced.push(d),
        }
    }
    for d in unplaced {
        if let Some(free) = rows.iter_mut().find(|r| r.text.is_empty()) {
            *free = row(d);
        }
    }
    rows
}

fn rows<T>(items: &[T], max: usize, row: impl Fn(&T) -> Row) -> Vec<Row> {
    let mut rows: Vec<Row> = items.iter().take(max).map(row).collect();
    rows.resize(max, Row::default());
    rows
}

impl Entered {
    /// The stored settings as a fresh form.
    pub fn from_settings(settings: &CallSettings) -> Self {
        Self {
            enabled: settings.enabled,
            destinations: rows(&settings.destinations, MAX_DESTINATIONS, |d| Row {
                text: d.address.as_str().to_owned(),
                checked: d.send,
            }),
            designated_only: settings.designated_only,
            missed_only: settings.missed_only,
            designated: placed_rows(&settings.designated),
            version: Some(settings.version),
        }
    }

    /// The submitted form's fields; anything else (a 6th row, unknown names) is ignored.
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        let text = |name: String| fields.get(&name).map(|v| v.trim().to_owned()).unwrap_or_default();
        let checked = |name: &str| fields.get(name).is_some_and(|v| !v.is_empty());
        Self {
            enabled: fields.get("enabled").is_some_and(|v| v == "on"),
            destinations: (0..MAX_DESTINATIONS)
                .map(|i| Row { text: text(format!("dest_{i}")), checked: checked(&format!("send_{i}")) })
                .collect(),
            designated_only: checked("designated_only"),
            missed_only: checked("missed_only"),
            designated: (0..MAX_DESIGNATED)
                .map(|i| Row { text: text(format!("designated_{i}")), checked: checked(&format!("designate_{i}")) })
                .collect(),
            version: fields.get("version").and_then(|v| v.parse().ok()),
        }
    }

    /// Whether every choice has a value the form offers: 開始/停止 is `on` or `off`, a
    /// check is `on` or absent. A browser sends nothing else; anything else is refused
    /// rather than read as 停止 (`enabled=maybe` was saved as 停止).
    pub fn check_choices(fields: &HashMap<String, String>) -> Result<(), ChoiceError> {
        for (name, value) in fields {
            let allowed: &[&str] = match name.as_str() {
                "enabled" => &["on", "off"],
                "designated_only" | "missed_only" => &["on"],
                _ if name.starts_with("send_") || name.starts_with("designate_") => &["on"],
                _ => continue,
            };
            if !allowed.contains(&value.as_str()) {
                return Err(ChoiceError { name: name.clone(), value: value.clone(), allowed });
            }
        }
        Ok(())
    }

    /// The settings entered, version left at 0 (the store sets it); or the rows' errors.
    pub fn parse(&self) -> Result<CallSettings, RowErrors> {
        let mut errors = RowErrors::default();
        let mut destinations = Vec::new();
        for (i, row) in self.destinations.iter().enumerate().filter(|(_, row)| !row.text.is_empty()) {
            match DestinationAddress::parse(&row.text) {
                Ok(address) if destinations.iter().any(|d: &Destination| d.address == address) => {
                    errors.destinations.insert(i, "同じメールアドレスがすでに入力されています。".to_owned());
                }
                Ok(address) => destinations.push(Destination { address, send: row.checked }),
                Err(error) => {
                    errors.destinations.insert(i, address_message(&error));
                }
            }
        }
        let mut designated = Vec::new();
        for (i, row) in self.designated.iter().enumerate().filter(|(_, row)| !row.text.is_empty()) {
            match PhoneNumber::parse(&row.text) {
                Ok(number) if designated.iter().any(|d: &Designated| d.number == number) => {
                    errors.designated.insert(i, "同じ電話番号がすでに入力されています。".to_owned());
                }
                Ok(number) => designated.push(Designated { number, designate: row.checked, row: u8::try_from(i).ok() }),
                Err(error) => {
                    errors.designated.insert(i, number_message(&error));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CallSettings {
            enabled: self.enabled,
            destinations,
            designated_only: self.designated_only,
            missed_only: self.missed_only,
            designated,
            version: 0,
        })
    }
}

/// R-N3's refusals, in the subscriber's words.
pub fn address_message(error: &AddressError) -> String {
    match error {
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

/// R-L2's refusals, in the subscriber's words.
pub fn number_message(error: &PhoneNumberError) -> String {
    match error {
        PhoneNumberError::Empty => "電話番号を入力してください。",
        PhoneNumberError::NotDigits(_) => "電話番号は半角数字のみ（ハイフンなし）で入力してください。",
        PhoneNumberError::NoLeadingZero(_) => "電話番号は0から始まる番号を入力してください。",
        PhoneNumberError::InternationalPrefix(_) => {
            "電話番号は市外局番から入力してください（00から始まる番号は使えません）。"
        }
        PhoneNumberError::Length { .. } => "電話番号は10桁または11桁で入力してください。",
    }
    .to_owned()
}

fn check_attr(checked: bool) -> &'static str {
    if checked {
        " checked"
    } else {
        ""
    }
}

fn row_error(message: Option<&String>) -> String {
    message.map(|m| format!(" <strong class=\"error\" role=\"alert\">{}</strong>", html::escape(m))).unwrap_or_default()
}

/// The path a destination row's 送信テスト button posts the form to (R-N2).
pub fn test_mail_path(action: &str, row: usize) -> String {
    format!("{action}/test/{row}")
}

/// The form's HTML: four sections, one 設定 button, and a 送信テスト button per
/// destination row that posts the same form to [`test_mail_path`] (`formaction` works
/// without JavaScript).
///
/// A hidden copy of the 設定 button comes first: pressing Enter in a field activates the
/// form's first submit button, which must save, not send a test mail.
pub fn render(action: &str, csrf: &str, entered: &Entered, errors: &RowErrors, password_max: usize) -> String {
    let mut out = format!("<form method=\"post\" action=\"{}\">\n{}", html::escape(action), html::csrf_field(csrf));
    out += "<button type=\"submit\" hidden tabindex=\"-1\" aria-hidden=\"true\">設定</button>\n";
    let version = entered.version.map(|v| v.to_string()).unwrap_or_default();
    out += &format!("<input type=\"hidden\" name=\"version\" value=\"{}\">\n", html::escape(&version));

    out += &format!(
        "<fieldset>\n<legend>開始/停止</legend>\n\
         <label><input type=\"radio\" name=\"enabled\" value=\"on\"{on}> 開始</label>\n\
         <label><input type=\"radio\" name=\"enabled\" value=\"off\"{off}> 停止</label>\n</fieldset>\n",
        on = check_attr(entered.enabled),
        off = check_attr(!entered.enabled),
    );

    out += "<fieldset>\n<legend>送信先メールアドレス設定</legend>\n\
            <p><small>最大5件。「送信」にチェックしたアドレスにのみお知らせします。\
            「送信テスト」で、入力したアドレスにテストメールを送信できます（設定は保存されません）。</small></p>\n";
    for (i, row) in entered.destinations.iter().enumerate() {
        out += &format!(
            "<p><label for=\"dest_{i}\">送信先{n}</label>\n\
             <input id=\"dest_{i}\" name=\"dest_{i}\" type=\"text\" inputmode=\"email\" \
             autocomplete=\"email\" value=\"{text}\" maxlength=\"256\">\n\
             <label><input type=\"checkbox\" name=\"send_{i}\" value=\"on\"{checked}> 送信</label>\n\
             <button type=\"submit\" formaction=\"{test}\">送信テスト</button>{error}</p>\n",
            n = i + 1,
            text = html::escape(&row.text),
            checked = check_attr(row.checked),
            test = html::escape(&test_mail_path(action, i)),
            error = row_error(errors.destinations.get(&i)),
        );
    }
    out += &format!(
        "<p><label for=\"current\">現在のパスワード</label><br>\n\
         <input id=\"current\" name=\"current\" type=\"password\" autocomplete=\"current-password\" \
         maxlength=\"{password_max}\"><br>\n\
         <small>送信先メールアドレスを変更するときだけ入力してください。</small></p>\n</fieldset>\n"
    );

    out += &format!(
        "<fieldset>\n<legend>メール送信条件設定</legend>\n\
         <p><label><input type=\"checkbox\" name=\"designated_only\" value=\"on\"{designated_only}> \
         指定した電話番号からの着信のみ</label></p>\n\
         <p><label><input type=\"checkbox\" name=\"missed_only\" value=\"on\"{missed_only}> \
         応答できなかった着信のみ</label></p>\n</fieldset>\n",
        designated_only = check_attr(entered.designated_only),
        missed_only = check_attr(entered.missed_only),
    );

    out += "<fieldset>\n<legend>お知らせ対象電話番号設定</legend>\n\
            <p><small>最大30件。半角数字（ハイフンなし）。「指定」にチェックした番号のみ対象になります。\
            入力欄は、設定すると空欄が追加されます。</small></p>\n";
    // The rows in use, in their places, and a few empty ones to add to (not all 30).
    let in_use = entered.designated.iter().rposition(|row| !row.text.is_empty()).map_or(0, |last| last + 1);
    let shown = (in_use + EMPTY_DESIGNATED_ROWS).min(entered.designated.len());
    for (i, row) in entered.designated.iter().enumerate().take(shown) {
        out += &format!(
            "<p><label for=\"designated_{i}\">{n}</label>\n\
             <input id=\"designated_{i}\" name=\"designated_{i}\" type=\"text\" inputmode=\"numeric\" \
             value=\"{text}\" maxlength=\"11\">\n\
             <label><input type=\"checkbox\" name=\"designate_{i}\" value=\"on\"{checked}> 指定</label>{error}</p>\n",
            n = i + 1,
            text = html::escape(&row.text),
            checked = check_attr(row.checked),
            error = row_error(errors.designated.get(&i)),
        );
    }
    out += "</fieldset>\n<p><button type=\"submit\">設定</button></p>\n</form>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn r_n3_and_r_l2_errors_are_reported_per_row_and_blank_rows_are_ignored() {
        let entered = Entered::from_fields(&fields(&[
            ("dest_0", "a@example.jp"),
            ("dest_2", "a@@example.jp"),
            ("dest_3", "あ@example.jp"),
            ("designated_1", "03-1234-5678"),
            ("designated_4", "0312345678"),
        ]));
        let errors = entered.parse().unwrap_err();
        assert_eq!(errors.destinations.len(), 2);
        assert!(errors.destinations[&2].contains("1つだけ"));
        assert!(errors.destinations[&3].contains("「あ」"));
        assert_eq!(errors.designated.len(), 1);
        assert!(errors.designated[&1].contains("ハイフンなし"));
    }

    #[test]
    fn stored_settings_round_trip_through_the_form() {
        let entered = Entered::from_fields(&fields(&[
            ("enabled", "on"),
            ("dest_1", " b@example.jp "),
            ("send_1", "on"),
            ("designated_0", "09012345678"),
            ("missed_only", "on"),
            ("version", "7"),
        ]));
        let settings = entered.parse().unwrap();
        assert!(settings.enabled && settings.missed_only && !settings.designated_only);
        assert_eq!(settings.destinations.len(), 1);
        assert_eq!(settings.destinations[0].address.as_str(), "b@example.jp");
        assert_eq!(entered.version, Some(7));
        let again = Entered::from_settings(&CallSettings { version: 7, ..settings.clone() });
        assert_eq!(again.parse().unwrap(), settings);
    }
}
