//! The pitr repository: where every byte pitr stores goes, and how it is proven intact.
//!
//! Layers, bottom up: a [`storage::Storage`] backend moves plain bytes by key (filesystem,
//! memory, S3); the [`envelope`] wraps each object with compression and a blake3 checksum
//! (and, later, encryption), encoded and decoded on worker threads by [`codec`]. The
//! byte-level format is in docs/FORMAT.md.

pub mod codec;
pub mod crypto;
pub mod envelope;
pub mod keys;
pub mod kms;
pub mod manifest;
pub mod markers;
pub mod objects;
pub mod pack;
pub mod pieces;
pub mod pool;
pub mod repository;
pub mod slots;
pub mod storage;
pub mod url;
pub mod worker;
