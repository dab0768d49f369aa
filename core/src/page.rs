//! Short HTML pages for errors the module answers itself.

/// A small standalone HTML page: `<title>` and `<h1>` are `title`, then `message` in a `<p>`,
/// then, if given, a link (`<a href="{href}">{text}</a>`). Every piece is HTML-escaped.
pub fn error_page(title: &str, message: &str, link: Option<(&str, &str)>) -> String {
    let title = escape_html(title);
    let message = escape_html(message);
    let link = link.map_or(String::new(), |(href, text)| {
        format!("<p><a href=\"{}\">{}</a></p>\n", escape_html(href), escape_html(text))
    });
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n\
         <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;padding:0 1em}}</style>\n\
         </head>\n<body>\n<h1>{title}</h1>\n<p>{message}</p>\n{link}</body>\n</html>\n"
    )
}

/// Escapes the five characters that matter in HTML text and double- or single-quoted attributes.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_title_heading_message_and_link() {
        let page = error_page(
            "Login failed",
            "The provider is down.",
            Some(("/retry?a=1&b=2", "Try again")),
        );
        assert!(page.starts_with("<!DOCTYPE html>\n"));
        assert!(page.contains("<meta name=\"viewport\""));
        assert!(page.contains("<title>Login failed</title>"));
        assert!(page.contains("<h1>Login failed</h1>"));
        assert!(page.contains("<p>The provider is down.</p>"));
        assert!(page.contains("<a href=\"/retry?a=1&amp;b=2\">Try again</a>"));
        assert!(page.ends_with("</html>\n"));
    }

    #[test]
    fn page_escapes_everything_and_loads_nothing() {
        let page = error_page("<script>", "a \"b\" & 'c'", Some(("javascript:\"><x", "<b>")));
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("a &quot;b&quot; &amp; &#39;c&#39;"));
        assert!(page.contains("href=\"javascript:&quot;&gt;&lt;x\""));
        assert!(page.contains("&lt;b&gt;</a>"));
        assert!(!page.contains("src="));
        assert!(!page.contains("<link"));
    }

    #[test]
    fn page_without_link_has_no_anchor() {
        assert!(!error_page("t", "m", None).contains("<a "));
    }
}
