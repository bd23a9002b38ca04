#!/usr/bin/env bash
# Builds the stripped release binaries for TARGET into target/TARGET/release/:
# tether-agent (device build: without the demo, which links the relay) for every target, and
# tether-relay for aarch64 (ARM cloud servers).
#   cross/build.sh aarch64-unknown-linux-gnu
#   cross/build.sh armv7-unknown-linux-gnueabihf
# Extra arguments go to cargo (for example --profile release-s).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: cross/build.sh TARGET [cargo args...]}
shift
. cross/env.sh "$target"

packages=(-p agent)
if [ "$target" = aarch64-unknown-linux-gnu ]; then
  packages+=(-p cloud-relay)
fi
started=$(date +%s)
echo "cross/build.sh: $target, standard library from $STD_SOURCE"
out="target/$target/release"
case "$STD_SOURCE" in
  rustup|debian)
    cargo build --release --locked --target "$target" --no-default-features "${packages[@]}" "$@"
    ;;
  build-std)
    # A target directory of its own: RUSTC_BOOTSTRAP changes build-script fingerprints.
    cargo build --release --locked --target "$target" --no-default-features "${packages[@]}" \
      -Zbuild-std=std,panic_abort --target-dir target/build-std "$@"
    mkdir -p "$out"
    for bin in tether-agent tether-relay; do
      if [ -f "target/build-std/$target/release/$bin" ]; then
        cp "target/build-std/$target/release/$bin" "$out/"
      fi
    done
    ;;
esac
elapsed=$(( $(date +%s) - started ))
for bin in "$out"/tether-agent "$out"/tether-relay; do
  if [ -f "$bin" ]; then
    awk -v b="$(stat -c %s "$bin")" -v f="$bin" 'BEGIN { printf "%s: %d bytes (%.1f MB), stripped\n", f, b, b / 1048576 }'
  fi
done
echo "cross/build.sh: $target built in ${elapsed} s"
