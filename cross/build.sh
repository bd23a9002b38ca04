#!/usr/bin/env bash
# Builds the stripped release binaries for TARGET into target/TARGET/release/ (or
# target/TARGET/PROFILE/ with --profile PROFILE):
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
# --profile NAME replaces --release (cargo takes one or the other).
profile=release
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --profile ]; then profile=${args[$((i + 1))]}; fi
done
profile_args=(--release)
[ "$profile" != release ] && profile_args=()
started=$(date +%s)
echo "cross/build.sh: $target ($profile profile), standard library from $STD_SOURCE"
out="target/$target/$profile"
case "$STD_SOURCE" in
  rustup|debian)
    cargo build "${profile_args[@]}" --locked --target "$target" --no-default-features --features agent/hw "${packages[@]}" "$@"
    ;;
  build-std)
    # A target directory of its own: RUSTC_BOOTSTRAP changes build-script fingerprints.
    cargo build "${profile_args[@]}" --locked --target "$target" --no-default-features --features agent/hw "${packages[@]}" \
      -Zbuild-std=std,panic_abort --target-dir target/build-std "$@"
    mkdir -p "$out"
    for bin in tether-agent tether-relay; do
      if [ -f "target/build-std/$target/$profile/$bin" ]; then
        cp "target/build-std/$target/$profile/$bin" "$out/"
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
