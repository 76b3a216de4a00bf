//! Standard Webhooks signatures.
//!
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`,
//! one `v1,…` per active secret, space-separated, where the key is the
//! base64-decoded part of a `whsec_…` secret. The legacy `x-hmac-signature`
//! is the hex HMAC-SHA256 of the body alone under the first secret.

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

/// The `webhook-signature` header value for one message.
pub fn signature_header(secrets: &[SigningSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut out = String::with_capacity(secrets.len() * 48);
    let ts = timestamp.to_string();
    for (i, secret) in secrets.iter().enumerate() {
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
    }

    #[test]
    fn legacy_signature_is_hex_hmac_of_the_body() {
        let s = SigningSecret::parse(SPEC_SECRET).expect("valid");
        let sig = legacy_signature(&s, SPEC_BODY);
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
