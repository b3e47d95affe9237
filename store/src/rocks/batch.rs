//! RocksDB's write batch through its C API, for the store writer: the `rocksdb` crate's
//! `WriteBatch` takes a value as one slice, so a log record (its header, then the body)
//! had to be joined in a buffer first and was copied again into the batch. `put_parts_cf`
//! hands RocksDB the parts (its `putv`): the body goes from the message's `Bytes` into
//! the batch once. Everything else mirrors the crate's batch, so the writer reads the same.

// One of the two modules of mqgate-store with `unsafe` (with `crc32c.rs`): calls into
// RocksDB's C API, each on handles this module owns or borrows for the call.
#![allow(unsafe_code)]

use std::ptr::NonNull;

use librocksdb_sys as ffi;
use rocksdb::{AsColumnFamilyRef, AsRawPtr, DB};

/// A RocksDB write batch (`rocksdb_writebatch_t`), owned.
pub(super) struct Batch(NonNull<ffi::rocksdb_writebatch_t>);

// SAFETY: a write batch is a plain heap object with no thread affinity (the `rocksdb`
// crate's `WriteBatch` is `Send` on the same grounds); it is only used through `&mut`.
unsafe impl Send for Batch {}

impl Default for Batch {
    fn default() -> Self {
        Self::with_capacity_bytes(0)
    }
}

impl Batch {
    /// An empty batch whose representation has room for `bytes` before it grows.
    pub(super) fn with_capacity_bytes(bytes: usize) -> Self {
        // SAFETY: returns a new batch (never null: C++ `new` aborts on failure).
        let raw = unsafe { ffi::rocksdb_writebatch_create_with_params(bytes, 0, 0, 0) };
        Self(NonNull::new(raw).expect("rocksdb_writebatch_create_with_params"))
    }

    /// A batch with the representation `data` (as [`Batch::data`] returned it).
    pub(super) fn from_data(data: &[u8]) -> Self {
        // SAFETY: RocksDB copies `data`; the pointer and length describe a live slice.
        let raw = unsafe { ffi::rocksdb_writebatch_create_from(data.as_ptr().cast(), data.len()) };
        Self(NonNull::new(raw).expect("rocksdb_writebatch_create_from"))
    }

    fn raw(&self) -> *mut ffi::rocksdb_writebatch_t {
        self.0.as_ptr()
    }

    pub(super) fn put_cf(
        &mut self,
        cf: &impl AsColumnFamilyRef,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        let (k, v) = (key.as_ref(), value.as_ref());
        // SAFETY: the batch and column family handle are live; RocksDB copies both slices.
        unsafe {
            ffi::rocksdb_writebatch_put_cf(
                self.raw(),
                cf.inner(),
                k.as_ptr().cast(),
                k.len(),
                v.as_ptr().cast(),
                v.len(),
            );
        }
    }

    /// Put `key` with the value `parts` joined, without joining them here.
    pub(super) fn put_parts_cf(
        &mut self,
        cf: &impl AsColumnFamilyRef,
        key: &[u8],
        parts: &[&[u8]],
    ) {
        const MAX_PARTS: usize = 4;
        assert!(parts.len() <= MAX_PARTS, "at most {MAX_PARTS} parts");
        let mut ptrs = [std::ptr::null::<std::ffi::c_char>(); MAX_PARTS];
        let mut lens = [0usize; MAX_PARTS];
        for (i, p) in parts.iter().enumerate() {
            ptrs[i] = p.as_ptr().cast();
            lens[i] = p.len();
        }
        let key_ptr: *const std::ffi::c_char = key.as_ptr().cast();
        let key_len = key.len();
        // SAFETY: the batch and column family handle are live; the arrays hold
        // `parts.len()` pointers and lengths of live slices, which RocksDB copies (a
        // `SliceParts` value is concatenated into the batch's representation).
        unsafe {
            ffi::rocksdb_writebatch_putv_cf(
                self.raw(),
                cf.inner(),
                1,
                &key_ptr,
                &key_len,
                parts.len() as i32,
                ptrs.as_ptr(),
                lens.as_ptr(),
            );
        }
    }

    pub(super) fn delete_cf(&mut self, cf: &impl AsColumnFamilyRef, key: impl AsRef<[u8]>) {
        let k = key.as_ref();
        // SAFETY: as `put_cf`.
        unsafe {
            ffi::rocksdb_writebatch_delete_cf(self.raw(), cf.inner(), k.as_ptr().cast(), k.len());
        }
    }

    pub(super) fn delete_range_cf(
        &mut self,
        cf: &impl AsColumnFamilyRef,
        from: impl AsRef<[u8]>,
        to: impl AsRef<[u8]>,
    ) {
        let (f, t) = (from.as_ref(), to.as_ref());
        // SAFETY: as `put_cf`.
        unsafe {
            ffi::rocksdb_writebatch_delete_range_cf(
                self.raw(),
                cf.inner(),
                f.as_ptr().cast(),
                f.len(),
                t.as_ptr().cast(),
                t.len(),
            );
        }
    }

    /// The batch's representation (what an external log stores as the record).
    pub(super) fn data(&self) -> &[u8] {
        let mut len = 0usize;
        // SAFETY: returns a pointer into the batch's representation, valid until the
        // batch is changed, which `&self` rules out for the slice's lifetime.
        unsafe {
            let p = ffi::rocksdb_writebatch_data(self.raw(), &mut len);
            std::slice::from_raw_parts(p.cast(), len)
        }
    }

    /// Write the batch to `db`, without the WAL if `disable_wal` (never synced here).
    pub(super) fn write(&self, db: &DB, disable_wal: bool) -> Result<(), String> {
        let opts = WriteOptions::new(disable_wal);
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the database, options and batch are live for the call; on failure
        // RocksDB sets `err` to a malloc'd C string, freed below.
        unsafe {
            ffi::rocksdb_write(db.as_raw_ptr(), opts.0.as_ptr(), self.raw(), &mut err);
            if err.is_null() {
                return Ok(());
            }
            let msg = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            ffi::rocksdb_free(err.cast());
            Err(msg)
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: created by one of the constructors above, destroyed once.
        unsafe { ffi::rocksdb_writebatch_destroy(self.raw()) }
    }
}

struct WriteOptions(NonNull<ffi::rocksdb_writeoptions_t>);

impl WriteOptions {
    fn new(disable_wal: bool) -> Self {
        // SAFETY: returns new options (never null), configured before use.
        unsafe {
            let raw = ffi::rocksdb_writeoptions_create();
            ffi::rocksdb_writeoptions_disable_WAL(raw, i32::from(disable_wal));
            Self(NonNull::new(raw).expect("rocksdb_writeoptions_create"))
        }
    }
}

impl Drop for WriteOptions {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe { ffi::rocksdb_writeoptions_destroy(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value put in parts reads back joined, beside ordinary puts, deletes and a
    /// range delete; the representation round-trips through `from_data`.
    #[test]
    fn parts_join_and_the_batch_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        let db = DB::open_cf(&o, dir.path(), ["a"]).unwrap();
        let cf = db.cf_handle("a").unwrap();
        let mut b = Batch::with_capacity_bytes(64);
        b.put_parts_cf(cf, b"k1", &[b"head-", b"", b"body"]);
        b.put_cf(cf, b"k2", b"v2");
        b.put_cf(cf, b"k3", b"v3");
        b.put_cf(cf, b"k4", b"v4");
        b.delete_cf(cf, b"k2");
        b.delete_range_cf(cf, b"k3", b"k4");
        let copy = Batch::from_data(b.data());
        assert_eq!(copy.data(), b.data());
        copy.write(&db, false).unwrap();
        assert_eq!(
            db.get_cf(cf, b"k1").unwrap().as_deref(),
            Some(&b"head-body"[..])
        );
        assert_eq!(db.get_cf(cf, b"k2").unwrap(), None);
        assert_eq!(db.get_cf(cf, b"k3").unwrap(), None);
        assert_eq!(db.get_cf(cf, b"k4").unwrap().as_deref(), Some(&b"v4"[..]));
        Batch::default().write(&db, true).unwrap();
    }
}
