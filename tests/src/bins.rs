//! Where the binaries under test are.

use std::path::{Path, PathBuf};

/// The directory holding `sa-image` and `shard-agent`.
///
/// `$SA_BIN_DIR` if set; else the profile directory of the running test executable
/// (`target/<profile>/deps/test-xxxx` gives `target/<profile>`); else `target/release` beside it.
/// Panics with the command to run when the binaries are missing.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SA_BIN_DIR") {
        let dir = PathBuf::from(dir);
        check(&dir, "SA_BIN_DIR");
        return dir;
    }
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable has no target/<profile> dir");
    let candidates = [profile.to_path_buf(), profile.with_file_name("release")];
    for dir in &candidates {
        if has_bins(dir) {
            return dir.clone();
        }
    }
    check(&candidates[0], "the test's target directory");
    unreachable!()
}

/// Path of binary `name` (`sa-image` or `shard-agent`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

fn has_bins(dir: &Path) -> bool {
    ["sa-image", "shard-agent"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn check(dir: &Path, from: &str) {
    if !has_bins(dir) {
        panic!(
            "build the binaries first: cargo build --release \
             (looked for sa-image and shard-agent in {} from {from}; set SA_BIN_DIR to point elsewhere)",
            dir.display()
        );
    }
}
