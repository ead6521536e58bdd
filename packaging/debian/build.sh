#!/usr/bin/env bash
# Builds the Debian packages into target/debian/ (or $CARGO_TARGET_DIR/debian/):
#   sa-image_VERSION-1_amd64.deb     /usr/bin/sa-image, sa-image-daemon.service,
#                                    /etc/sa-image/config.toml, man pages, completions
#   shard-agent_VERSION-1_amd64.deb  /usr/bin/shard-agent, shard-agent.service (user
#                                    shard-agent, /var/lib/shard-agent), /etc/sa-image/shard-agent.toml
# from the release build (profile `release`: no debug info; cargo-deb strips the symbols too).
# Man pages and bash/zsh/fish completions are generated here by each binary from its own clap
# definitions (its hidden `manpages DIR` and `completions SHELL` subcommands, crate sa-clidocs),
# into target/release/packaging/; nothing generated is committed.
# cargo-deb is installed with `cargo install cargo-deb --locked` the first time (a few minutes,
# once per machine).
# Usage: packaging/debian/build.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin

if [ ! -x "$cargo_bin/cargo-deb" ]; then
  echo "installing cargo-deb into $cargo_bin (once per machine)"
  cargo install cargo-deb --locked --quiet
fi
cargo build --release -p sa-imager -p shard-agent

# Man pages (gzipped, as Debian wants them) and completions of target/release/BIN into
# target/release/packaging/BIN/.
gen=$target/release/packaging
docs() {
  local bin=$1 exe=$target/release/$1 out=$gen/$1
  rm -rf "$out"
  mkdir -p "$out/man" "$out/completions"
  "$exe" manpages "$out/man" >/dev/null
  gzip -9n "$out/man"/*.1
  "$exe" completions bash >"$out/completions/$bin.bash"
  "$exe" completions zsh >"$out/completions/_$bin"
  "$exe" completions fish >"$out/completions/$bin.fish"
}

mkdir -p "$target/debian"
docs sa-image
cargo deb -p sa-imager --no-build --output "$target/debian/"

docs shard-agent
cargo deb -p shard-agent --no-build --variant docs --output "$target/debian/"
