//! pitr's write side: putting WAL into the repository (`wal-push`), and later the stream
//! service and base backups.

pub mod ahead;
pub mod pg;
pub mod summary_json;
pub mod tar;
pub mod wal_push;
