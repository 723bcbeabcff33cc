//! The filter's own answers: `{"error":"<code>","message":"<one line>"}` with the contract's status,
//! `WWW-Authenticate` on 401 and `Retry-After` on 429/503. Messages are fixed text chosen by the
//! filter; nothing from the request or a store is ever echoed.

use crate::wire::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    BadRequest,
    MissingCredential,
    InvalidCredential,
    ExpiredCredential,
    RevokedCredential,
    Forbidden,
    UnknownTarget,
    RateLimited,
    QuotaExhausted,
    /// The request's cost does not fit in what is left of the credential's `lim.spend`.
    SpendExhausted,
    /// The request body is larger than the target buffers to read its cost (413).
    BodyTooLarge,
    SecretUnavailable,
}

impl Code {
    pub const ALL: [Code; 12] = [
        Code::BadRequest,
        Code::MissingCredential,
        Code::InvalidCredential,
        Code::ExpiredCredential,
        Code::RevokedCredential,
        Code::Forbidden,
        Code::UnknownTarget,
        Code::RateLimited,
        Code::QuotaExhausted,
        Code::SpendExhausted,
        Code::BodyTooLarge,
        Code::SecretUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::MissingCredential => "missing_credential",
            Code::InvalidCredential => "invalid_credential",
            Code::ExpiredCredential => "expired_credential",
            Code::RevokedCredential => "revoked_credential",
            Code::Forbidden => "forbidden",
            Code::UnknownTarget => "unknown_target",
            Code::RateLimited => "rate_limited",
            Code::QuotaExhausted => "quota_exhausted",
            Code::SpendExhausted => "spend_exhausted",
            Code::BodyTooLarge => "body_too_large",
            Code::SecretUnavailable => "secret_unavailable",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Code::BadRequest => 400,
            Code::MissingCredential | Code::InvalidCredential | Code::ExpiredCredential | Code::RevokedCredential => 401,
            Code::Forbidden | Code::UnknownTarget => 403,
            Code::RateLimited | Code::QuotaExhausted | Code::SpendExhausted => 429,
            Code::BodyTooLarge => 413,
            Code::SecretUnavailable => 503,
        }
    }

    pub fn index(self) -> usize {
        Code::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// A denial: what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: Code,
    pub message: &'static str,
    pub retry_after_s: Option<u32>,
}

impl Denial {
    pub fn new(code: Code, message: &'static str) -> Denial {
        Denial { code, message, retry_after_s: None }
    }
    pub fn retry_after(mut self, s: u32) -> Denial {
        self.retry_after_s = Some(s);
        self
    }

    pub fn status(&self) -> u32 {
        self.code.status()
    }

    pub fn body(&self) -> String {
        let mut b = String::from("{\"error\":");
        json::write_str(&mut b, self.code.as_str());
        b.push_str(",\"message\":");
        json::write_str(&mut b, self.message);
        b.push('}');
        b
    }

    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())];
        if self.code.status() == 401 {
            h.push(("www-authenticate", "Bearer error=\"invalid_token\"".to_string()));
        }
        if let Some(s) = self.retry_after_s {
            h.push(("retry-after", s.to_string()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_headers() {
        let d = Denial::new(Code::ExpiredCredential, "the credential has expired");
        assert_eq!(d.status(), 401);
        assert_eq!(d.body(), r#"{"error":"expired_credential","message":"the credential has expired"}"#);
        assert!(d.headers().iter().any(|(k, v)| *k == "www-authenticate" && v == "Bearer error=\"invalid_token\""));
        let d = Denial::new(Code::SecretUnavailable, "x").retry_after(5);
        assert_eq!(d.status(), 503);
        assert!(d.headers().iter().any(|(k, v)| *k == "retry-after" && v == "5"));
        assert!(!d.headers().iter().any(|(k, _)| *k == "www-authenticate"));
        for c in Code::ALL {
            assert_eq!(Code::ALL[c.index()], c);
            let parsed = crate::wire::json::parse(Denial::new(c, "m").body().as_bytes());
            assert!(parsed.is_ok());
        }
    }
}
