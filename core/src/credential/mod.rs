//! Step one and two of the pipeline: find the workload's credential in the request
//! (`extract`), refuse copies of it elsewhere (`copies`), verify it (`jwt`, with `verified` remembering credentials already checked), and
//! refuse revoked ones (`revocation`).

pub mod copies;
pub mod extract;
pub mod jwt;
pub mod revocation;
pub mod verified;
