#!/usr/bin/env bash
# Installs, idempotently, every outside tool the test suite uses as an oracle:
# qemu-img (VHD), libvhdi (VHD chains), xva-img (XVA), nbdinfo (NBD), the
# official Python XenAPI SDK, aiosmtpd (SMTP), and the servers the remote
# repository backend tests run on 127.0.0.1: OpenSSH sshd (SFTP), moto's S3
# server, s3s-fs and s3rver (S3).
# Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v xva-img  >/dev/null 2>&1 || need_apt+=(xva-img)
command -v nbdinfo  >/dev/null 2>&1 || need_apt+=(libnbd-bin)
command -v openssl  >/dev/null 2>&1 || need_apt+=(openssl)
# SFTP backend tests: sshd (run as the current user) and the ssh client.
{ [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1; } || need_apt+=(openssh-server)
command -v ssh      >/dev/null 2>&1 || need_apt+=(openssh-client)
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

# S3 backend tests: moto's S3 server (atomic If-None-Match, virtual-host style).
if ! python3 -c 'import moto, flask, flask_cors' >/dev/null 2>&1 \
   || [ "$(python3 -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "5.2.1" ]; then
  echo "installing moto's S3 server (S3 backend tests)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
fi

# S3 backend tests: s3s-fs (checks request signatures). Builds from source,
# about 4 minutes on two cores.
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  echo "installing s3s-fs 0.14.1 (S3 backend tests)" >&2
  cargo install --locked s3s-fs --version 0.14.1 --features binary
fi

# S3 backend tests: s3rver (npm), an S3 server that ignores If-None-Match, for
# the stat-then-put fallback. Installed under ~/.local (its launcher in
# ~/.local/bin), with Debian's node and npm when they are missing.
S3RVER_DIR="$HOME/.local/share/xenvault-test-tools/s3rver"
if ! command -v s3rver >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/s3rver" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing Debian packages: nodejs npm" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "installing s3rver 3.7.1 (S3 backend tests)" >&2
  mkdir -p "$S3RVER_DIR" "$HOME/.local/bin"
  npm install --silent --no-audit --no-fund --prefix "$S3RVER_DIR" s3rver@3.7.1 >/dev/null
  ln -sf "$S3RVER_DIR/node_modules/.bin/s3rver" "$HOME/.local/bin/s3rver"
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
