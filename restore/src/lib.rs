//! pitr's read side: fetching WAL for recovery (`wal-fetch`), reading backups back
//! (`backup_files`), and later restore, verify and drill.

pub mod backup_files;
pub mod copy;
pub mod dest;
pub mod drill;
pub mod expire;
pub mod files;
pub mod plan;
pub mod recovery;
pub mod repack;
pub mod restorer;
pub mod spool;
pub mod start;
pub mod target;
pub mod verify;
pub mod wal_fetch;
