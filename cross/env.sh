# Sourced by build.sh and smoke.sh: the toolchain settings for one target.
#   . cross/env.sh TARGET
# Sets GCC_TRIPLE, QEMU (the command that runs the target's binaries) and the cargo/cc
# variables; decides how the standard library comes: rustup's, Debian's prebuilt, or built
# from source (-Zbuild-std), in that order of preference.

cross_target=${1:?usage: . cross/env.sh TARGET}
case "$cross_target" in
  aarch64-unknown-linux-gnu) GCC_TRIPLE=aarch64-linux-gnu; QEMU_ARCH=aarch64 ;;
  armv7-unknown-linux-gnueabihf) GCC_TRIPLE=arm-linux-gnueabihf; QEMU_ARCH=arm ;;
  *)
    echo "unsupported target $cross_target; use aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
upper=$(echo "$cross_target" | tr 'a-z-' 'A-Z_')
under=$(echo "$cross_target" | tr '-' '_')
export "CARGO_TARGET_${upper}_LINKER=${GCC_TRIPLE}-gcc"
export "CC_${under}=${GCC_TRIPLE}-gcc" "AR_${under}=${GCC_TRIPLE}-ar"
# -E LD_LIBRARY_PATH: without it qemu mixes the cross ld.so with the multiarch libc that
# Debian's arm64 std package pulls in, and every thread start spins forever.
QEMU="qemu-${QEMU_ARCH} -L /usr/${GCC_TRIPLE} -E LD_LIBRARY_PATH=/usr/${GCC_TRIPLE}/lib"
export "CARGO_TARGET_${upper}_RUNNER=${QEMU}"

for tool in "${GCC_TRIPLE}-gcc" "qemu-${QEMU_ARCH}"; do
  if ! command -v "$tool" >/dev/null; then
    echo "$tool is missing: run cross/setup-debian.sh (as root) first" >&2
    return 1 2>/dev/null || exit 1
  fi
done

if rustup target list --installed 2>/dev/null | grep -qx "$cross_target"; then
  STD_SOURCE=rustup
elif [ -x /usr/bin/rustc ] && [ -d "/usr/lib/rustlib/$cross_target/lib" ]; then
  STD_SOURCE=debian
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
elif [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust/library ]; then
  STD_SOURCE=build-std
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
else
  echo "no standard library for $cross_target: rustup target add $cross_target, or run cross/setup-debian.sh" >&2
  return 1 2>/dev/null || exit 1
fi
export STD_SOURCE GCC_TRIPLE QEMU
