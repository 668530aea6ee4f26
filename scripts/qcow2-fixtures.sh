#!/usr/bin/env bash
# Regenerates testdata/qcow2: small QCOW2 images made by qemu-img/qemu-io from
# deterministic data, the sha256 of qemu's raw reading of each (SHA256SUMS)
# and qemu-img map's answer for each (NAME.map.json), so backend/qcow2's tests
# can compare the reader with qemu without qemu being installed.
#
# 2 MiB-cluster images are not committed: their metadata clusters alone are
# 10 MiB. The tests make one in a temp dir when qemu-img is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=testdata/qcow2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
rm -f "$out"/*.qcow2 "$out"/*.map.json "$out"/SHA256SUMS

# gen PATH SIZE SEED: a raw disk of 4 KiB blocks that are zeros, random bytes
# or repeated words (compressible), chosen by a seeded generator.
gen() {
	python3 - "$@" <<'PY'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
words = [b"qcow2", b"cluster", b"sector", b"extent", b"zstd", b"deflate", b"\x00\x00", b"S3"]
buf = bytearray()
while len(buf) < size:
    k = r.random()
    if k < 0.35:
        buf += bytes(4096)
    elif k < 0.55:
        buf += r.randbytes(4096)
    else:
        blk = bytearray()
        while len(blk) < 4096:
            blk += r.choice(words) + bytes([r.randrange(256)])
        buf += blk[:4096]
with open(path, "wb") as f:
    f.write(buf[:size])
PY
}

io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$f" >/dev/null; }

# v2 (compat=0.10), 4 KiB clusters, size not a multiple of the cluster, data in the last partial cluster.
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 "$out/v2-4k.qcow2" 3146505
io "$out/v2-4k.qcow2" "write -P 0xa1 0 8k" "write -P 0xb2 1051576 17000" "write -z 8k 4k" "write -P 0xc3 3146005 500"

# v3, 64 KiB clusters: zero clusters over holes and over data, last partial cluster.
qemu-img create -q -f qcow2 "$out/v3-64k.qcow2" 5241880
io "$out/v3-64k.qcow2" "write -P 0x21 0 64k" "write -P 0x22 1048676 60000" "write -z 2M 128k" \
	"write -P 0x23 3M 128k" "write -z 3M 64k" "write -P 0x24 5241180 700"

# v3, 512-byte clusters (the smallest).
qemu-img create -q -f qcow2 -o cluster_size=512 "$out/v3-512.qcow2" 1048876
io "$out/v3-512.qcow2" "write -P 0x31 0 1536" "write -P 0x32 70000 9000" "write -z 200k 2k" "write -P 0x33 1048800 76"

# Compressed: zlib and zstd, 4 KiB and 512-byte clusters, from seeded data
# (a 64 KiB-cluster compressed image is made by the tests when qemu-img is
# installed: four metadata clusters make it too large to commit).
gen "$tmp/a.raw" 701852 1
gen "$tmp/b.raw" 300100 2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/a.raw" "$out/v3-4k-zlib.qcow2"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd "$tmp/a.raw" "$out/v3-4k-zstd.qcow2"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 "$tmp/b.raw" "$out/v3-512-zlib.qcow2"

# Compressed, normal and zero clusters in one image.
gen "$tmp/c.raw" 524288 3
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd "$tmp/c.raw" "$out/v3-4k-mixed.qcow2"
io "$out/v3-4k-mixed.qcow2" "write -P 0x41 8k 12k" "write -z 64k 16k" "write -P 0x42 300000 3000"

for f in "$out"/*.qcow2; do
	n=$(basename "$f" .qcow2)
	qemu-img convert -f qcow2 -O raw "$f" "$tmp/$n.raw"
	(cd "$tmp" && sha256sum "$n.raw") >>"$out/SHA256SUMS"
	qemu-img map -f qcow2 --output=json "$f" >"$out/$n.map.json"
done
du -sh "$out"
