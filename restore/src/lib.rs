//! pitr's read side: fetching WAL for recovery (`wal-fetch`), and later restore, verify and
//! drill.

pub mod spool;
pub mod wal_fetch;
