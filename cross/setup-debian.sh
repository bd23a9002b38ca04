#!/usr/bin/env bash
# Installs what cross/build.sh and cross/smoke.sh need on Debian 12 (root; about a minute and
# 1.3 GB): Debian's rustc-web with its arm64 standard library and its library sources (for
# building armv7's standard library), the GNU cross toolchains, and qemu-user.
#
# With rustup and internet access you can skip the Rust parts instead:
#   rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
#                   gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "cross/setup-debian.sh installs packages: run it as root (or with sudo)" >&2
  exit 1
fi
# Only arm64 as a foreign architecture: the armhf standard library is built from source, and an
# armhf index that fails to download (seen on mirrors mid-sync) would stop apt.
dpkg --add-architecture arm64
apt-get update || echo "apt-get update reported errors; trying the install anyway" >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  rustc-web libstd-rust-web-dev:arm64 rust-web-src \
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
  qemu-user
echo "cross/setup-debian.sh: done. Build with cross/build.sh aarch64-unknown-linux-gnu"
