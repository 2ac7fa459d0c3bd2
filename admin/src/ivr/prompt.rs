//! The IVR's prompts, verbatim from SERVICE.md §3.

use std::fmt;

use engine::phone::PhoneNumber;

/// Which announcement the phone line plays; serialised as the spec's ids
/// (`SELECT_UNIT`, …) so an IVR platform can map each to a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptId {
    /// 認証単位の選択: 1 line, 2 number, 3 admin/user.
    SelectUnit,
    /// 電話番号の入力, ending with `#` (R-I3).
    EnterNumber,
    /// 仮パスワードの入力 for the target number (R-I5).
    EnterPassword,
    /// 仮パスワードの確認入力 (R-I5).
    Confirm,
    /// 入力誤り: the same entry is asked again (R-I3, R-I5, R-I6).
    Invalid,
    /// 設定完了; the call ends (R-I7).
    Done,
    /// The third invalid entry: the call ends and the subscriber is asked to dial again
    /// (R-I6). Not among the seed's prompts, which end the call in silence; a platform
    /// needs something to say before it hangs up.
    Ended,
}

impl PromptId {
    /// The spec's id, e.g. `"SELECT_UNIT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelectUnit => "SELECT_UNIT",
            Self::EnterNumber => "ENTER_NUMBER",
            Self::EnterPassword => "ENTER_PASSWORD",
            Self::Confirm => "CONFIRM",
            Self::Invalid => "INVALID",
            Self::Done => "DONE",
            Self::Ended => "ENDED",
        }
    }

    /// The prompt's wording, `{n}` standing for the target number.
    pub fn template(self) -> &'static str {
        match self {
            Self::SelectUnit => "仮パスワード設定をする単位を選択します。回線単位に設定する場合は1、電話番号単位に設定する場合は2、管理者/ユーザー単位に設定する場合は3を入力してください。",
            Self::EnterNumber => "仮パスワードを設定する電話番号を市外局番から入力し、最後に#を押してください。",
            Self::EnterPassword => "{n}番の仮パスワードの設定を行います。設定したい仮パスワードを入力してください。",
            Self::Confirm => "確認のためにもう一度仮パスワードを入力してください。",
            Self::Invalid => "入力された番号が正しくありません。もう一度押してください。",
            Self::Done => "{n}番の仮パスワードの設定が完了しました。ご利用ありがとうございました。",
            Self::Ended => "入力された番号が正しくありません。お手数ですが、もう一度おかけ直しください。",
        }
    }
}

impl fmt::Display for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An announcement to play: its id and its text with the target number filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub id: PromptId,
    pub text: String,
}

impl Prompt {
    /// A prompt without a number in it.
    pub fn new(id: PromptId) -> Self {
        Self { id, text: id.template().to_owned() }
    }

    /// A prompt that reads back `target` (ENTER_PASSWORD, DONE).
    pub fn for_number(id: PromptId, target: &PhoneNumber) -> Self {
        Self { id, text: id.template().replace("{n}", target.as_str()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_number_is_read_back() {
        let n = PhoneNumber::parse("0312345678").unwrap();
        assert_eq!(
            Prompt::for_number(PromptId::Done, &n).text,
            "0312345678番の仮パスワードの設定が完了しました。ご利用ありがとうございました。"
        );
    }

    #[test]
    fn ids_serialise_as_the_spec_writes_them() {
        for id in [
            PromptId::SelectUnit,
            PromptId::EnterNumber,
            PromptId::EnterPassword,
            PromptId::Confirm,
            PromptId::Invalid,
            PromptId::Done,
        ] {
            assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        }
    }
}
