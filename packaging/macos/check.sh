#!/usr/bin/env bash
# Type-checks shard-agent for macOS (Intel and Apple silicon) on a Linux machine, warnings denied,
# and checks that the launchd job file parses.
#
# What works and what does not, with Debian's packages only:
# - `rustup target add x86_64-apple-darwin aarch64-apple-darwin` gives Rust's standard library.
# - Some dependencies compile C in their build scripts (ring, zstd-sys, libmimalloc-sys), and
#   those need macOS's SDK headers (TargetConditionals.h, its libc), which no Debian package has.
#   `cargo check` never links those C objects, so here they are compiled as Linux objects
#   (clang --target=x86_64-linux-gnu / aarch64-linux-gnu, with libc6-dev-arm64-cross for the
#   arm64 glibc headers): every line of *Rust* is checked for macOS, the C is not.
# - Linking a macOS binary is not possible here (no Mach-O libSystem); build on a Mac, or a
#   machine with the SDK, with `cargo build --release -p shard-agent`.
set -euo pipefail
cd "$(dirname "$0")/../.."

python3 -c 'import plistlib, sys; plistlib.load(open(sys.argv[1], "rb"))' \
  packaging/macos/com.sa-image.shard-agent.plist

for target in x86_64-apple-darwin aarch64-apple-darwin; do
  arch=${target%%-*}
  cflags="--target=$arch-linux-gnu"
  [ "$arch" = aarch64 ] && cflags="$cflags -isystem /usr/aarch64-linux-gnu/include"
  var=${target//-/_}
  env "CC_$var=clang" "CFLAGS_$var=$cflags" \
    cargo clippy -p shard-agent --all-targets --target "$target" -- -D warnings
done
