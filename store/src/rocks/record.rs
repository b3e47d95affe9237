//! Reading the records of an external log: a record is the bytes of one RocksDB write
//! batch, whose operations name their column families by number. A follower that keeps
//! state beside its view (the meta follower's router, issue 16) learns from here what a
//! record changed in the keyed area.

use bytes::Bytes;
use rocksdb::{WriteBatchIteratorCf, DB};

use super::keys::CF_KV;
use crate::store::KvChange;

/// The number RocksDB gives the column family `name` of `db` in write batches.
/// Learned from a batch that writes to it (the Rust binding does not expose handle ids),
/// once per open.
pub(super) fn cf_id(db: &DB, name: &str) -> u32 {
    struct First(Option<u32>);
    impl WriteBatchIteratorCf for First {
        fn put_cf(&mut self, cf: u32, _: &[u8], _: &[u8]) {
            self.0.get_or_insert(cf);
        }
        fn delete_cf(&mut self, cf: u32, _: &[u8]) {
            self.0.get_or_insert(cf);
        }
        fn merge_cf(&mut self, cf: u32, _: &[u8], _: &[u8]) {
            self.0.get_or_insert(cf);
        }
    }
    let mut probe = rocksdb::WriteBatch::default();
    probe.put_cf(
        db.cf_handle(name).expect("column family created at open"),
        b"",
        b"",
    );
    let mut first = First(None);
    probe.iterate_cf(&mut first);
    first.0.expect("the probe batch holds one put")
}

/// The keyed-area changes in `record` (the bytes of a write batch), in order; `kv_cf`
/// is the keyed area's column-family number ([`cf_id`]). Other column families are
/// skipped; a key without the namespace separator is skipped too (never written so).
pub(super) fn kv_changes(record: &[u8], kv_cf: u32) -> Vec<KvChange> {
    struct Collect {
        kv_cf: u32,
        out: Vec<KvChange>,
    }
    impl Collect {
        fn push(&mut self, cf: u32, key: &[u8], value: Option<&[u8]>) {
            if cf != self.kv_cf {
                return;
            }
            let Some(sep) = key.iter().position(|b| *b == 0) else {
                return;
            };
            self.out.push(KvChange {
                namespace: String::from_utf8_lossy(&key[..sep]).into_owned(),
                key: Bytes::copy_from_slice(&key[sep + 1..]),
                value: value.map(Bytes::copy_from_slice),
            });
        }
    }
    impl WriteBatchIteratorCf for Collect {
        fn put_cf(&mut self, cf: u32, key: &[u8], value: &[u8]) {
            self.push(cf, key, Some(value));
        }
        fn delete_cf(&mut self, cf: u32, key: &[u8]) {
            self.push(cf, key, None);
        }
        fn merge_cf(&mut self, _: u32, _: &[u8], _: &[u8]) {}
    }
    let mut c = Collect {
        kv_cf,
        out: Vec::new(),
    };
    rocksdb::WriteBatch::from_data(record).iterate_cf(&mut c);
    c.out
}

/// [`cf_id`] of the keyed area.
pub(super) fn kv_cf_id(db: &DB) -> u32 {
    cf_id(db, CF_KV)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;
    use crate::rocks::keys::{kv_key, CF_LOG, CF_META};
    use crate::rocks::recovery::open_db;
    use crate::rocks::RocksConfig;

    #[test]
    fn kv_changes_of_a_record_in_order_other_families_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&RocksConfig::new(dir.path()), &Arc::new(AtomicU64::new(0))).unwrap();
        let kv = db.cf_handle(CF_KV).unwrap();
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(db.cf_handle(CF_LOG).unwrap(), 7u64.to_be_bytes(), b"body");
        wb.put_cf(kv, kv_key("core.binding", b"a\0b"), b"v1");
        wb.put_cf(db.cf_handle(CF_META).unwrap(), b"hdr", b"x");
        wb.delete_cf(kv, kv_key("amqp.queue", b"q"));
        wb.put_cf(kv, kv_key("", b""), b"");
        let id = kv_cf_id(&db);
        assert_ne!(id, cf_id(&db, CF_LOG));
        assert_eq!(
            kv_changes(wb.data(), id),
            vec![
                KvChange {
                    namespace: "core.binding".into(),
                    key: Bytes::from_static(b"a\0b"),
                    value: Some(Bytes::from_static(b"v1")),
                },
                KvChange {
                    namespace: "amqp.queue".into(),
                    key: Bytes::from_static(b"q"),
                    value: None,
                },
                KvChange {
                    namespace: String::new(),
                    key: Bytes::new(),
                    value: Some(Bytes::new()),
                },
            ]
        );
        // Applying the record gives the same keyed area it describes.
        db.write(rocksdb::WriteBatch::from_data(wb.data())).unwrap();
        assert_eq!(
            db.get_cf(kv, kv_key("core.binding", b"a\0b"))
                .unwrap()
                .as_deref(),
            Some(&b"v1"[..])
        );
    }
}
