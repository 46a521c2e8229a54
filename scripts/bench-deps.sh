#!/usr/bin/env bash
# Installs, idempotently, the peers and tools of `xenvault-bench repo`:
# restic and borg (the Debian packages, measured against xenvault in the same run),
# e2fsprogs (mke2fs -d builds the benchmark's filesystem image without mounting),
# and GNU time (peak memory of child processes).
# Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
command -v restic >/dev/null 2>&1 || need_apt+=(restic)
command -v borg   >/dev/null 2>&1 || need_apt+=(borgbackup)
command -v mke2fs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
[ -x /usr/bin/time ] || need_apt+=(time)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
restic version
borg --version
mke2fs -V 2>&1 | head -1
