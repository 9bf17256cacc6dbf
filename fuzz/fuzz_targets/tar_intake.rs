//! Tar intake (plain or gzip) with every hostile-input rule: any input either gives a change
//! set or an `IntakeError`, never a panic, and stays within the limits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prepub_core::cas::LocalCas;
use prepub_core::intake::{read_tar, IntakeLimits};
use prepub_core::object::EncodeParams;

fn cas() -> &'static LocalCas {
    static CAS: OnceLock<(tempfile::TempDir, LocalCas)> = OnceLock::new();
    &CAS.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let c = LocalCas::create(&d.path().join("cas")).unwrap().without_fsync();
        (d, c)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let limits = IntakeLimits {
        max_entry_size: 1 << 20,
        max_total_size: 4 << 20,
        max_entries: 10_000,
        skip_special: data.first().is_some_and(|b| b & 1 == 1),
    };
    let top = data.first().is_some_and(|b| b & 2 == 2);
    if let Ok(cs) = read_tar(data, top, &EncodeParams::default(), &limits, cas(), 0) {
        assert!(cs.stats.entries <= limits.max_entries);
    }
});
