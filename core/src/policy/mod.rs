//! Step three: what a verified credential may do. `rules` match the request against the
//! target's and the credential's allow-lists; `cost` prices it; `limits` count it against its
//! rate, total and spend caps.

pub mod cost;
pub mod limits;
pub mod rules;
pub mod tokens;
