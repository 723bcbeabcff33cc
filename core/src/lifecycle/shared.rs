//! Records in Envoy shared data, read and updated with compare-and-swap through the `Host`.

use super::state::Names;
use crate::host::{Host, HostError};
use crate::policy::limits::Table;
use crate::secrets::approle::SessionState;
use crate::secrets::keys;
use crate::secrets::slot_state::SlotState;

/// Compare-and-swap attempts on a shared record before giving up (fail closed).
const CAS_TRIES: u32 = 16;

/// A record kept in shared data.
pub(super) trait Record: Default {
    fn decode_record(b: &[u8]) -> Option<Self>;
    fn encode_record(&self) -> Vec<u8>;
}

impl Record for SlotState {
    fn decode_record(b: &[u8]) -> Option<Self> {
        SlotState::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

impl Record for SessionState {
    fn decode_record(b: &[u8]) -> Option<Self> {
        SessionState::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

/// Read-modify-write a shared record. `f` returns whether it changed anything (nothing is
/// written otherwise). `None`: the record could not be written.
pub(super) fn update<R: Record>(host: &mut impl Host, key: &str, mut f: impl FnMut(&mut R) -> bool) -> Option<bool> {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host.shared_get(key);
        let mut st = bytes.as_deref().and_then(R::decode_record).unwrap_or_default();
        if !f(&mut st) {
            return Some(false);
        }
        match host.shared_set(key, &st.encode_record(), cas) {
            Ok(()) => return Some(true),
            Err(HostError::CasMismatch) => continue,
            Err(HostError::Failed) => return None,
        }
    }
    None
}

pub(super) fn read<R: Record>(host: &impl Host, key: &str) -> R {
    host.shared_get(key).0.as_deref().and_then(R::decode_record).unwrap_or_default()
}

/// Create every shared record of a configuration that does not exist yet. Envoy's shared data
/// accepts any CAS for a key that does not exist, so two workers creating the same record could
/// both win; created at configure time (the main thread's configuration runs first), a record
/// exists before any worker competes for it.
pub(super) fn create_records(host: &mut impl Host, names: &Names) {
    let table = Table::default().encode();
    for key in keys::limit_shards() {
        create(host, &key, &table);
    }
    let session = SessionState::default().encode();
    for key in names.sessions.iter().flatten() {
        create(host, key, &session);
    }
    let slot = SlotState::default().encode();
    for key in names.secrets.iter().filter(|k| !k.is_empty()) {
        create(host, key, &slot);
    }
}

fn create(host: &mut impl Host, key: &str, empty: &[u8]) {
    if host.shared_get(key).1.is_none() {
        let _ = host.shared_set(key, empty, None);
    }
}
