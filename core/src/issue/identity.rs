//! Who a caller is, as the `aws_iam` grant sees it: the STS host it proves itself to, and the IAM
//! principal an ARN from STS names. Plain values (no callouts), so that the configuration can
//! check its role map with them.

/// STS's settings (`issuer.aws_iam`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsSettings {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u32,
    pub server_id: String,
}

/// The IAM principal an ARN from STS names, as the role map keys it: an assumed-role session
/// (`arn:aws:sts::<acct>:assumed-role/<role>/<session>`) maps to its role
/// (`arn:aws:iam::<acct>:role/<role>`); IAM users and roles map to themselves. Roles with a path
/// cannot be told apart from STS's ARN (it drops the path): key them without it.
pub fn principal(arn: &str) -> Option<String> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(service), Some(""), Some(account), Some(resource)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if account.len() != 12 || !account.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    match (service, resource.split('/').collect::<Vec<_>>().as_slice()) {
        ("sts", ["assumed-role", role, session]) if !role.is_empty() && !session.is_empty() => Some(format!("arn:{partition}:iam::{account}:role/{role}")),
        ("iam", ["role" | "user", ..]) => Some(arn.to_string()),
        _ => None,
    }
}
