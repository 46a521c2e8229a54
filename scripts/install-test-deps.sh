#!/usr/bin/env bash
# Installs, idempotently, every outside tool the test suite uses as an oracle:
# qemu-img (VHD), libvhdi (VHD chains), xva-img (XVA), nbdinfo (NBD), the
# official Python XenAPI SDK, aiosmtpd (SMTP).
# Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v xva-img  >/dev/null 2>&1 || need_apt+=(xva-img)
command -v nbdinfo  >/dev/null 2>&1 || need_apt+=(libnbd-bin)
command -v openssl  >/dev/null 2>&1 || need_apt+=(openssl)
# libvhdi: an independent reader of differencing VHD chains (qemu ignores parents).
/usr/bin/python3 -c 'import pyvhdi' >/dev/null 2>&1 || need_apt+=(python3-libvhdi libvhdi-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import XenAPI' >/dev/null 2>&1; then
  echo "installing the Python XenAPI SDK" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'XenAPI==26.21.1'
fi

if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  echo "installing aiosmtpd (SMTP server for the email tests)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'aiosmtpd==1.4.6'
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
