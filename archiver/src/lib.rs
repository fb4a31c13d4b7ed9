//! pitr's write side: putting WAL into the repository (`wal-push`), base backups
//! (`backup`), and later the stream service.

pub mod ahead;
pub mod backup;
pub mod data_dir;
pub mod pg;
pub mod stream;
pub mod summary_json;
pub mod tar;
pub mod wal_push;
