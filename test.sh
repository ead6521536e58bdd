#!/usr/bin/env bash
# The README's test command: everything the tests need, then every test.
#
# As root on Debian 12 it first installs what the tests use (the Debian packages below, qemu
# from bookworm-backports, cargo-deb once per machine) and, after the build, makes the .deb
# packages that tests/tests/packages.rs installs (packaging/debian/build.sh). Anywhere else it
# installs nothing, and the tests that need root or Debian say why they skip.
# Then: cargo build --release --workspace --all-targets && cargo test --release --workspace
# Usage: ./test.sh   (.ci/run runs it after the style gates)
set -euo pipefail
cd "$(dirname "$0")"

debian_root=false
if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
  debian_root=true
fi

if $debian_root; then
  export DEBIAN_FRONTEND=noninteractive
  # qemu 10 lives in bookworm-backports; installing qemu-system-x86 from the main suite would
  # remove the machine's qemu-utils 10 (see shared/test-stack.md). Add the suite on the existing host.
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && ! grep -q bookworm-backports "$src"; then
    sed -i '0,/^Suites:.*bookworm-updates/ s/^\(Suites:.*bookworm-updates\)$/\1 bookworm-backports/' "$src"
  fi
  apt-get update -qq
  # NBD clients and servers, disk tools (lvm2: snapshot --lvm-snapshot) and a kernel for the VM
  # tests; chromium (the daemon's status page), wine64 and mingw (the Windows agent); systemd (systemd-analyze, and with dbus a logind for --keep-awake),
  # man-db, bash-completion, zsh, fish, binutils (strip) and dpkg-dev for the package tests.
  apt-get install -y -qq --no-install-recommends \
    libnbd-bin python3-libnbd openssl nbdkit fuse3 e2fsprogs fdisk util-linux busybox-static extlinux \
    syslinux-common linux-image-cloud-amd64 kmod cpio iproute2 lvm2 \
    systemd dbus man-db bash-completion zsh fish binutils dpkg-dev \
    chromium wine64 gcc-mingw-w64-x86-64 clang libc6-dev-arm64-cross >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  # The daemon's tests: a real SMTP server (aiosmtpd) and the Prometheus text parser; the
  # offsite tests and bench/offsite.sh: the AWS CLI, to look into the bucket with a client not ours.
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd prometheus_client awscli
else
  echo "note: not root on Debian: installing nothing; tests that need root or the Debian" \
    "packages skip and say why" >&2
fi
if command -v rustup >/dev/null; then
  # The agent on desk PCs' other OSes: tests/tests/windows_agent.rs builds and runs the Windows
  # agent under Wine; packaging/macos/check.sh type-checks the macOS one.
  rustup target add x86_64-pc-windows-gnu x86_64-apple-darwin aarch64-apple-darwin >/dev/null 2>&1
fi

# The offsite tests (tests/tests/offsite.rs) run a real Garage cluster: built from crates.io
# once per machine (about 6 minutes on 2 cores), with only the LMDB metadata engine.
if ! [ -x "$HOME/.cargo/bin/garage" ]; then
  cargo install --quiet --locked garage --version 2.5.0 --no-default-features \
    --features bundled-libs,lmdb
fi

cargo build --release --workspace --all-targets
if $debian_root; then
  packaging/debian/build.sh
fi
cargo test --release --workspace
