//! Credentials issued by the gateway (the contract's "v2 additions"): a route whose keyward
//! metadata is `{"endpoint": "issue"}` answers a grant with an ordinary v1 credential signed by the
//! configured issuing key. `sts` checks an `aws_iam` grant's proof of identity and reads STS's
//! answer.

pub mod grant;
pub mod identity;
pub mod settings;
pub mod sts;
