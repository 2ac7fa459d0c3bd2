//! The 着信お知らせメール settings form (R-N1..R-N5): its fields as entered, their
//! parsing into [`CallSettings`] with messages per row, and its HTML.
//!
//! Rows are fixed: [`engine::store::MAX_DESTINATIONS`] address rows and
//! [`MAX_DESIGNATED`] number rows, read by index, so a sixth address cannot be submitted
//! at all. Blank rows are ignored. 開始/停止 and the 送信先 rows are built from
//! [`super::form_parts`], which the FAXお知らせメール form shares.

use std::collections::HashMap;

use engine::phone::PhoneNumberError;
use engine::store::{CallSettings, Designated, MAX_DESIGNATED};

use super::form_parts::{
    check_attr, check_form_choices, destination_rows, destination_rows_from_fields, destinations_fieldset,
    enabled_fieldset, field_checked, field_text, form_start, parse_destinations, row_error, typed_number, ChoiceError,
    CurrentPassword, Row,
};
use super::html;

/// Empty お知らせ対象電話番号 rows shown after the last one in use.
pub const EMPTY_DESIGNATED_ROWS: usize = 3;

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
    /// The send conditions' error: "designated only" with no number designated.
    pub conditions: Option<String>,
}

impl RowErrors {
    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty() && self.designated.is_empty() && self.conditions.is_none()
    }
}

/// "Designated only" on with no number designated would filter every call (R-N5: only
/// checked entries count): refused, in the subscriber's words.
pub const NONE_DESIGNATED: &str = "「指定した電話番号からの着信のみ」にする場合は、お知らせ対象電話番号を入力し、「指定」にチェックを入れてください（チェックのない番号からの着信はお知らせしません）。";

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

impl Entered {
    /// The stored settings as a fresh form.
    pub fn from_settings(settings: &CallSettings) -> Self {
        Self {
            enabled: settings.enabled,
            destinations: destination_rows(&settings.destinations),
            designated_only: settings.designated_only,
            missed_only: settings.missed_only,
            designated: placed_rows(&settings.designated),
            version: Some(settings.version),
        }
    }

    /// The submitted form's fields; anything else (a 6th row, unknown names) is ignored.
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        Self {
            enabled: fields.get("enabled").is_some_and(|v| v == "on"),
            destinations: destination_rows_from_fields(fields),
            designated_only: field_checked(fields, "designated_only"),
            missed_only: field_checked(fields, "missed_only"),
            designated: (0..MAX_DESIGNATED)
                .map(|i| Row {
                    text: field_text(fields, &format!("designated_{i}")),
                    checked: field_checked(fields, &format!("designate_{i}")),
                })
                .collect(),
            version: fields.get("version").and_then(|v| v.parse().ok()),
        }
    }

    /// Whether every choice has a value the form offers ([`check_form_choices`]).
    pub fn check_choices(fields: &HashMap<String, String>) -> Result<(), ChoiceError> {
        check_form_choices(fields, |name| {
            matches!(name, "designated_only" | "missed_only")
                || name.starts_with("send_")
                || name.starts_with("designate_")
        })
    }

    /// The settings entered, version left at 0 (the store sets it); or the rows' errors.
    pub fn parse(&self) -> Result<CallSettings, RowErrors> {
        let mut errors = RowErrors::default();
        let destinations = parse_destinations(&self.destinations, &mut errors.destinations);
        let mut designated = Vec::new();
        for (i, row) in self.designated.iter().enumerate().filter(|(_, row)| !row.text.is_empty()) {
            match typed_number(&row.text) {
                Ok(number) if designated.iter().any(|d: &Designated| d.number == number) => {
                    errors.designated.insert(i, "同じ電話番号がすでに入力されています。".to_owned());
                }
                Ok(number) => designated.push(Designated { number, designate: row.checked, row: u8::try_from(i).ok() }),
                Err(error) => {
                    errors.designated.insert(i, number_message(&error));
                }
            }
        }
        if self.designated_only && errors.designated.is_empty() && !designated.iter().any(|d| d.designate) {
            errors.conditions = Some(NONE_DESIGNATED.to_owned());
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

/// The form's HTML: four sections and one 設定 button.
pub fn render(action: &str, csrf: &str, entered: &Entered, errors: &RowErrors, password: CurrentPassword) -> String {
    let mut out = form_start(action, csrf, entered.version);
    out += &enabled_fieldset(entered.enabled);
    out += &destinations_fieldset(action, &entered.destinations, &errors.destinations, password);

    out += &format!(
        "<fieldset>\n<legend>メール送信条件設定</legend>\n\
         <p><label><input type=\"checkbox\" name=\"designated_only\" value=\"on\"{designated_only}> \
         指定した電話番号からの着信のみ</label>{conditions_error}</p>\n\
         <p><label><input type=\"checkbox\" name=\"missed_only\" value=\"on\"{missed_only}> \
         応答できなかった着信のみ</label></p>\n</fieldset>\n",
        designated_only = check_attr(entered.designated_only),
        conditions_error = row_error(errors.conditions.as_ref()),
        missed_only = check_attr(entered.missed_only),
    );

    out += "<fieldset>\n<legend>お知らせ対象電話番号設定</legend>\n\
            <p><small>最大30件。半角数字（ハイフンなし）。「指定」にチェックした番号のみ対象になります。\
            入力欄は、設定すると空欄が追加されます。\
            指定した番号からの着信でも、発信者番号を非通知にしてかけてきた場合はお知らせしません。</small></p>\n";
    // The rows in use, in their places, and a few empty ones to add to (not all 30).
    let in_use = entered.designated.iter().rposition(|row| !row.text.is_empty()).map_or(0, |last| last + 1);
    let shown = (in_use + EMPTY_DESIGNATED_ROWS).min(entered.designated.len());
    for (i, row) in entered.designated.iter().enumerate().take(shown) {
        out += &format!(
            "<p><label for=\"designated_{i}\">{n}</label>\n\
             <input id=\"designated_{i}\" name=\"designated_{i}\" type=\"text\" inputmode=\"numeric\" \
             value=\"{text}\" maxlength=\"20\" aria-label=\"お知らせ対象電話番号{n}\">\n\
             <label><input type=\"checkbox\" name=\"designate_{i}\" value=\"on\"{checked} \
             aria-label=\"お知らせ対象電話番号{n}を指定\"> 指定</label>{error}</p>\n",
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
            ("designated_1", "03-1234-567x"),
            ("designated_4", "0312345678"),
        ]));
        let errors = entered.parse().unwrap_err();
        assert_eq!(errors.destinations.len(), 2);
        assert!(errors.destinations[&2].contains("1つだけ"));
        assert!(errors.destinations[&3].contains("「あ」"));
        assert_eq!(errors.designated.len(), 1);
        assert!(errors.designated[&1].contains("ハイフンなし"));
    }

    /// R-N4, R-N5: "designated only" with no number designated (none typed, or none
    /// ticked 指定) would filter every call: refused, and the page says why. Before, it
    /// was saved, 設定しました, and no mail ever came.
    #[test]
    fn r_n5_designated_only_with_no_number_designated_is_refused() {
        for rows in [&[][..], &[("designated_0", "09011112222")][..]] {
            let mut pairs = vec![("enabled", "on"), ("dest_0", "a@example.jp"), ("send_0", "on")];
            pairs.push(("designated_only", "on"));
            pairs.extend_from_slice(rows);
            let entered = Entered::from_fields(&fields(&pairs));
            let errors = entered.parse().unwrap_err();
            assert_eq!(errors.conditions.as_deref(), Some(NONE_DESIGNATED), "{rows:?}");
            let page = render("/settings", "t", &entered, &errors, CurrentPassword { max: 128, refused: None });
            assert!(page.contains("入力し、「指定」にチェックを入れてください"), "{page}");
        }
        let designated = fields(&[("designated_only", "on"), ("designated_3", "09011112222"), ("designate_3", "on")]);
        assert!(Entered::from_fields(&designated).parse().is_ok(), "one designated is enough");
        let off = fields(&[("designated_3", "09011112222")]);
        assert!(Entered::from_fields(&off).parse().is_ok(), "unticked numbers are kept while the condition is off");
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
