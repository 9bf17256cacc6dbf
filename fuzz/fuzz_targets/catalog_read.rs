//! Catalog reading: any bytes as a catalog database (or as a zlib object holding one) are
//! opened, listed and walked without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prepub_core::catalog::db::CatalogDb;
use prepub_core::hash::{Digest20, ObjectId, Suffix};

fuzz_target!(|data: &[u8]| {
    // As a stored (compressed) catalog object first.
    let id = ObjectId::new(Digest20::of(data), Suffix::Catalog);
    let plain = prepub_core::object::decode_to_vec(&id, data, true)
        .unwrap_or_else(|_| data.to_vec());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.db");
    std::fs::write(&f, &plain).unwrap();
    let Ok(db) = CatalogDb::open(&f, false) else {
        return;
    };
    let _ = db.revision();
    let _ = db.root_prefix();
    let _ = db.property("previous_revision");
    let _ = db.object_refs();
    let _ = db.nested();
    if let Ok(entries) = db.list("") {
        for e in entries.iter().take(50) {
            let _ = db.lookup(&format!("/{}", e.name));
        }
    }
});
