#!/usr/bin/env bash
# Installs what vmexportfs needs to build, test and demo on a fresh Debian
# machine (run as root): FUSE 3 and the tools the tests drive.
set -euo pipefail

# python3: the fs tests call lseek(SEEK_DATA/SEEK_HOLE) and getxattr with a
# short buffer from a child process, as a program other than the mount's
# server must.
packages=(fuse3 qemu-utils nbdkit attr rsync libvhdi-utils pigz curl python3 make ca-certificates)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "setup: run as root to install: ${missing[*]}" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	echo "setup: Go is in /usr/local/go/bin; add it to PATH" >&2
fi
command -v go >/dev/null || [[ -x /usr/local/go/bin/go ]] || {
	echo "setup: Go 1.26 or newer is needed (https://go.dev/dl/)" >&2
	exit 1
}
[[ -e /dev/fuse ]] || { echo "setup: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }
echo "setup: ok"
