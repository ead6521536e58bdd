//! Builds the test boot image into a directory and prints what a test would get, for manual
//! inspection: `cargo run -p sa-vm-tests --example build_image -- DIR [SIZE_MIB]` (as root), then
//! e.g. `qemu-system-x86_64 -accel tcg -nographic -m 512 -no-reboot
//! -drive file=DIR/boot.img,format=raw,if=virtio`.

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| {
        eprintln!("usage: build_image DIR [SIZE_MIB]");
        std::process::exit(2)
    });
    let size_mib = args
        .next()
        .map_or(96, |s| s.parse().expect("SIZE_MIB: a number"));
    let t = std::time::Instant::now();
    match sa_vm_tests::build_boot_image(std::path::Path::new(&dir), size_mib) {
        Ok(img) => println!("{img:#?}\nbuilt in {:.2?}", t.elapsed()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}
