//! What the certificate tests of this module share: the SPIFFE ID their
//! SVIDs name, and the wall clock in Unix seconds, as certificates take it.

use std::time::{SystemTime, UNIX_EPOCH};

pub(super) const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// Now, in whole seconds since the Unix epoch.
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `secs` (Unix seconds) as a certificate's validity bound.
pub(super) fn at(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}
