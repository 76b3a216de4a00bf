//! Standard Webhooks signatures.
//!
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`,
//! one `v1,…` per active secret, space-separated, where the key is the
//! base64-decoded part of a `whsec_…` secret. The legacy `x-hmac-signature`
//! is the hex HMAC-SHA256 of the body alone under the current secret.
//!
//! An endpoint has one current secret and, during a rotation, previous ones
//! that expire: every secret still active signs, so receivers can switch keys
//! at their own pace. Key material never leaves this module in readable form:
//! `Debug` prints `<redacted>` and errors never quote the value.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Key lengths accepted, in bytes (Standard Webhooks recommends 24 to 64).
const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    key: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a signing secret must start with \"whsec_\"")]
    MissingPrefix,
    #[error("a signing secret must be whsec_ followed by base64")]
    NotBase64,
    #[error("a signing secret's key must be 24 to 64 bytes, this one is {0}")]
    BadLength(usize),
}

impl SigningSecret {
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let b64 = s.trim().strip_prefix("whsec_").ok_or(SecretError::MissingPrefix)?;
        let key = B64.decode(b64).map_err(|_| SecretError::NotBase64)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(SigningSecret { key })
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// One of an endpoint's secrets: the current one has no expiry; previous ones
/// keep signing until theirs (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSecret {
    pub secret: SigningSecret,
    pub expires_at: Option<i64>,
}

/// An endpoint's secrets, the current ones first.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secrets(Vec<EndpointSecret>);

impl Secrets {
    pub fn new(mut list: Vec<EndpointSecret>) -> Self {
        list.sort_by_key(|s| s.expires_at.is_some());
        Secrets(list)
    }

    /// The secrets that sign at `now` (unix seconds).
    pub fn active(&self, now: i64) -> impl Iterator<Item = &SigningSecret> {
        self.0.iter().filter(move |s| s.expires_at.is_none_or(|at| now < at)).map(|s| &s.secret)
    }

    /// The secret with no expiry that the legacy header uses.
    pub fn current(&self) -> Option<&SigningSecret> {
        self.0.iter().find(|s| s.expires_at.is_none()).map(|s| &s.secret)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let expiries: Vec<_> = self.0.iter().map(|s| s.expires_at).collect();
        write!(f, "Secrets(<{} redacted>, expires_at: {expiries:?})", self.0.len())
    }
}

/// The `webhook-signature` header value for one message.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a SigningSecret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut out = String::with_capacity(96);
    let ts = timestamp.to_string();
    for (i, secret) in secrets.into_iter().enumerate() {
        let mut mac = secret.mac();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body);
        if i > 0 {
            out.push(' ');
        }
        out.push_str("v1,");
        B64.encode_string(mac.finalize().into_bytes(), &mut out);
    }
    out
}

/// The legacy `x-hmac-signature` value: hex HMAC-SHA256 of the body.
pub fn legacy_signature(secret: &SigningSecret, body: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_specification_example() {
        let s = SigningSecret::parse(SPEC_SECRET).expect("valid secret");
        assert_eq!(signature_header(&[s], SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn several_secrets_give_space_separated_signatures() {
        let a = SigningSecret::parse(SPEC_SECRET).expect("valid");
        let b = SigningSecret::parse(&format!("whsec_{}", B64.encode([7u8; 32]))).expect("valid");
        let h = signature_header(&[a, b], SPEC_ID, SPEC_TS, SPEC_BODY);
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], SPEC_SIG);
        assert!(parts[1].starts_with("v1,") && parts[1] != SPEC_SIG);
    }

    #[test]
    fn bad_secrets_are_refused_and_never_printed() {
        assert_eq!(SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert_eq!(SigningSecret::parse("whsec_!!!"), Err(SecretError::NotBase64));
        assert_eq!(SigningSecret::parse("whsec_c2hvcnQ="), Err(SecretError::BadLength(5)));
        let s = SigningSecret::parse(SPEC_SECRET).expect("valid");
        assert_eq!(format!("{s:?}"), "SigningSecret(<redacted>)");
        let set = Secrets::new(vec![EndpointSecret { secret: s, expires_at: Some(5) }]);
        assert_eq!(format!("{set:?}"), "Secrets(<1 redacted>, expires_at: [Some(5)])");
    }

    #[test]
    fn previous_secrets_sign_until_they_expire() {
        let current = SigningSecret::parse(SPEC_SECRET).expect("valid");
        let old = SigningSecret::parse(&format!("whsec_{}", B64.encode([7u8; 32]))).expect("valid");
        let set = Secrets::new(vec![
            EndpointSecret { secret: old.clone(), expires_at: Some(1000) },
            EndpointSecret { secret: current.clone(), expires_at: None },
        ]);
        assert_eq!(set.current(), Some(&current));
        assert_eq!(set.active(999).collect::<Vec<_>>(), [&current, &old], "current first, then previous");
        assert_eq!(set.active(1000).collect::<Vec<_>>(), [&current], "expired at its instant");
        let header = signature_header(set.active(999), SPEC_ID, SPEC_TS, SPEC_BODY);
        assert!(header.starts_with(SPEC_SIG) && header.split(' ').count() == 2, "{header}");
    }

    #[test]
    fn legacy_signature_is_hex_hmac_of_the_body() {
        let s = SigningSecret::parse(SPEC_SECRET).expect("valid");
        let sig = legacy_signature(&s, SPEC_BODY);
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
