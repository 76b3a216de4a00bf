//! Printing URLs without the credentials people put in them.
//!
//! Endpoint URLs sometimes carry a password (`https://user:pass@host/`), a
//! token in the query (`?token=…`, `?sig=…`, `?api_key=…`) or a token in the
//! path (Slack's `/services/T…/B…/<token>`, Discord's `/api/webhooks/<id>/<token>`).
//! Wherever webhookd prints a URL it prints [`redacted_url`]: user information
//! is replaced, path segments that look like tokens and the values of
//! secret-looking query parameters are masked.

use url::Url;

const MASK: &str = "REDACTED";

/// Query parameter names (lower case) that contain any of these are masked.
const SECRET_WORDS: &[&str] =
    &["token", "secret", "key", "pass", "pwd", "auth", "sig", "credential", "session", "jwt", "bearer", "code"];

/// Whether a query parameter of this name probably carries a secret.
pub fn is_secret_param(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
}

/// A path segment that is long, or mixes letters and digits like an id or a
/// token does. Masking a harmless one costs nothing.
fn looks_like_token(seg: &str) -> bool {
    let letters = seg.bytes().any(|b| b.is_ascii_alphabetic());
    let digits = seg.bytes().any(|b| b.is_ascii_digit());
    seg.len() > 16 || (seg.len() >= 8 && letters && digits)
}

/// `url` with user information and secret-looking query values masked.
pub fn redacted_url(url: &Url) -> String {
    let mut u = url.clone();
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username(MASK);
        let _ = u.set_password(None);
    }
    let path: Vec<String> = u
        .path_segments()
        .map(|segs| segs.map(|s| if looks_like_token(s) { MASK.to_owned() } else { s.to_owned() }).collect())
        .unwrap_or_default();
    if !path.is_empty() {
        u.set_path(&path.join("/"));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) { MASK.to_owned() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_secret_parameters_are_masked() {
        let u =
            Url::parse("https://alice:s3cr3t@hooks.example.com/in?tenant=7&token=abc123&X-Amz-Signature=f00&apiKey=k9")
                .expect("URL");
        let shown = redacted_url(&u);
        for secret in ["alice", "s3cr3t", "abc123", "f00", "k9"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.starts_with("https://REDACTED@hooks.example.com/in?tenant=7&token=REDACTED"), "{shown}");
        let plain = Url::parse("https://hooks.example.com/in?page=2").expect("URL");
        assert_eq!(redacted_url(&plain), "https://hooks.example.com/in?page=2");
        let slack =
            Url::parse("https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/abcdefghijklmnopqrstuvwx").expect("URL");
        assert_eq!(redacted_url(&slack), "https://hooks.slack.com/services/REDACTED/REDACTED/REDACTED");
        let discord = Url::parse("https://discord.com/api/webhooks/123456789012345678/Zx9-token_part").expect("URL");
        assert_eq!(redacted_url(&discord), "https://discord.com/api/webhooks/REDACTED/REDACTED");
    }
}
