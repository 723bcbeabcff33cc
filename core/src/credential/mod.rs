//! Step one and two of the pipeline: find the workload's credential in the request
//! (`extract`), verify it (`jwt`, with `verified` remembering credentials already checked), and
//! refuse revoked ones (`revocation`).

pub mod extract;
pub mod jwt;
pub mod revocation;
pub mod verified;
