//! Builds the vm-tests boot image for scripts (bench/drill.sh):
//! `bench_image DIR [check|writer]` writes `DIR/boot.img` and prints its path. Needs root.
//! `check` (the default) boots, checks and powers off; `writer` keeps running (see
//! [`sa_vm_tests::GuestProgram`]).

use sa_vm_tests::{build_boot_image_with, GuestProgram, ImageOptions};

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: bench_image DIR [check|writer]");
        return std::process::ExitCode::from(64);
    };
    let program = match args.next().as_deref() {
        None | Some("check") => GuestProgram::BootCheck,
        Some("writer") => GuestProgram::Writer,
        Some(other) => {
            eprintln!("unknown guest program {other:?}: give check or writer");
            return std::process::ExitCode::from(64);
        }
    };
    let opts = ImageOptions {
        program,
        ..ImageOptions::default()
    };
    match build_boot_image_with(std::path::Path::new(&dir), &opts) {
        Ok(img) => {
            println!("{}", img.path.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
