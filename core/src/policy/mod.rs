//! Step three: what a verified credential may do. `rules` match the request against the
//! target's and the credential's allow-lists; `limits` count it against its rate and total caps.

pub mod limits;
pub mod rules;
