//! HTML rendering by hand: a handful of small pages do not justify a template engine,
//! and one escaping function that every interpolated value goes through is easy to
//! audit.

/// Escapes `text` for use in HTML text and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: `title` is plain text (escaped here), `body` is HTML built by the
/// caller with [`escape`] around every value. No scripts or inline styles, so the
/// strict Content-Security-Policy holds and the site works without JavaScript.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"ja\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} | ひかり電話設定サイト</title>\n<link rel=\"stylesheet\" href=\"/style.css\">\n\
         </head>\n<body>\n<header class=\"site\"><p><a href=\"/\">ひかり電話設定サイト</a></p></header>\n\
         <main>\n<h1>{title}</h1>\n{body}</main>\n</body>\n</html>\n",
        title = escape(title),
    )
}

/// The site's stylesheet (`/style.css`).
pub const STYLE: &str = include_str!("style.css");

/// A list of error messages shown above a form, or nothing.
pub fn errors(messages: &[String]) -> String {
    if messages.is_empty() {
        return String::new();
    }
    let items: String = messages.iter().map(|m| format!("<li>{}</li>\n", escape(m))).collect();
    // The alert role on a wrapper: on the list itself it would take the items out of it.
    format!("<div role=\"alert\"><ul class=\"errors\">\n{items}</ul></div>\n")
}

/// The hidden field every form carries (double-submit before login, per session after).
pub fn csrf_field(token: &str) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">\n", escape(token))
}

/// The ログアウト button: a form, because logout changes state and so must be a POST
/// with the session's CSRF token.
pub fn logout_form(csrf: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/logout\">\n{}<p><button type=\"submit\">ログアウト</button></p>\n</form>\n",
        csrf_field(csrf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(escape("電話番号"), "電話番号");
    }
}
