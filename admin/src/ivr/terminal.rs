//! The temporary-password line on a terminal (`callnotify ivr --caller 0312345678`):
//! an operator tries the flow by hand, typing each entry's keys as one line.
//!
//! ```text
//! [SELECT_UNIT] 仮パスワード設定をする単位を選択します。…
//! SELECT_UNIT> 1
//! [ENTER_PASSWORD] 0312345678番の仮パスワードの設定を行います。…
//! ```
//!
//! It runs the same [`Call`] as the HTTP API, against the real store: a completed call
//! really sets the temporary password and the line's unit (R-I7).

use std::io::{self, BufRead, Write};

use super::call::{Call, IvrError, Step};
use super::{Ivr, PromptId};

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("terminal I/O failed: {0}")]
    Io(#[from] io::Error),
    /// Includes the R-I1 refusal of a caller that is not on a provisioned line.
    #[error(transparent)]
    Ivr(#[from] IvrError),
}

/// Plays a call from `caller`: prints each prompt (id and text), reads one line of keys
/// per entry from `input`, until the call ends or `input` does (the caller hung up).
/// Keys are the line without surrounding whitespace.
pub fn run(ivr: &Ivr, caller: &str, mut input: impl BufRead, mut output: impl Write) -> Result<(), TerminalError> {
    let (mut call, mut step) = Call::start(ivr, caller)?;
    let mut line = String::new();
    loop {
        show(&mut output, &step)?;
        let Some(awaiting) = step.awaiting.filter(|_| !step.ends) else {
            return Ok(());
        };
        write!(output, "{awaiting}> ")?;
        output.flush()?;
        line.clear();
        if input.read_line(&mut line)? == 0 {
            writeln!(output, "\n(hung up)")?;
            return Ok(());
        }
        step = call.input(line.trim())?;
    }
}

fn show(output: &mut impl Write, step: &Step) -> io::Result<()> {
    match &step.prompt {
        Some(prompt) => writeln!(output, "[{}] {}", prompt.id, prompt.text)?,
        None => writeln!(output, "(no prompt)")?,
    }
    match (step.ends, step.prompt.as_ref().map(|p| p.id)) {
        (false, _) => Ok(()),
        (true, Some(PromptId::Ended)) => {
            writeln!(output, "(call ended after three invalid entries; the subscriber must dial again)")
        }
        (true, _) => writeln!(output, "(call ended)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::testing::{fixture, n, ADDITIONAL, CONTRACT};

    fn play(f: &crate::testing::Fixture, caller: &str, keys: &str) -> (Result<(), TerminalError>, String) {
        let mut out = Vec::new();
        let result = run(&f.ivr, caller, keys.as_bytes(), &mut out);
        (result, String::from_utf8(out).unwrap())
    }

    #[test]
    fn r_i4_r_i7_a_scripted_call_sets_the_temporary_password() {
        let f = fixture();
        let (result, out) = play(&f, ADDITIONAL, "3\n 12345678 \r\n12345678\n");
        result.unwrap();
        let expected = "\
[SELECT_UNIT] 仮パスワード設定をする単位を選択します。回線単位に設定する場合は1、電話番号単位に設定する場合は2、管理者/ユーザー単位に設定する場合は3を入力してください。
SELECT_UNIT> [ENTER_PASSWORD] 0312345679番の仮パスワードの設定を行います。設定したい仮パスワードを入力してください。
ENTER_PASSWORD> [CONFIRM] 確認のためにもう一度仮パスワードを入力してください。
CONFIRM> [DONE] 0312345679番の仮パスワードの設定が完了しました。ご利用ありがとうございました。
(call ended)
";
        assert_eq!(out, expected);
        assert!(f.credentials.verify(&n(ADDITIONAL), "12345678", f.clock.now()).unwrap().is_ok());
    }

    #[test]
    fn r_i6_three_invalid_entries_end_the_terminal_call() {
        let f = fixture();
        let (result, out) = play(&f, CONTRACT, "2\n0312345679\n\n9\n1\n");
        result.unwrap();
        assert_eq!(
            out.matches("[INVALID] 入力された番号が正しくありません。もう一度押してください。").count(),
            2,
            "{out}"
        );
        assert!(
            out.ends_with(
                "[ENDED] 入力された番号が正しくありません。お手数ですが、もう一度おかけ直しください。\n\
                 (call ended after three invalid entries; the subscriber must dial again)\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn end_of_input_hangs_up() {
        let f = fixture();
        let (result, out) = play(&f, CONTRACT, "1\n");
        result.unwrap();
        assert!(out.ends_with("ENTER_PASSWORD> \n(hung up)\n"), "{out}");
    }

    #[test]
    fn r_i1_a_caller_not_on_a_line_is_refused() {
        let f = fixture();
        let (result, out) = play(&f, "0399999999", "1\n");
        assert!(matches!(result, Err(TerminalError::Ivr(IvrError::NotProvisioned(_)))), "{result:?}");
        assert_eq!(out, "");
    }
}
