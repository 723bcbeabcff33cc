//! Step four: the vendor's real key. `store` speaks to Vault/OpenBao and AWS Secrets Manager,
//! `approle` keeps a Vault session, `slot_state` is the shared record of one cached secret, and
//! `keys` names every shared-data entry. The lifecycle that ties them together across callouts and
//! ticks is `crate::lifecycle`.

pub mod approle;
pub mod keys;
pub mod slot_state;
pub mod store;
