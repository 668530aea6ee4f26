#!/usr/bin/env bash
# Benchmarks vmexportfs against the wire (curl of the disk route) and against
# other ways to mount an HTTP disk, all in one run on the same simulator:
#   sparse: 2 GiB with 512 MiB written in 64 extents
#   full:   1 GiB fully written
# Needs root (FUSE). Prints a Markdown table. Optional: rclone, nbdkit+nbdfuse.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"

BIN=${BIN:-bin/vmexportfs}
[[ -x $BIN ]] || go build -o "$BIN" ./cmd/vmexportfs

work=$(mktemp -d /tmp/vmexportfs-bench.XXXXXX)
pids=()
mounts=()
cleanup() {
	for m in "${mounts[@]}" "$work/rclone"; do fusermount3 -u -z "$m" 2>/dev/null || true; done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
mbps() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / 1048576 / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
# serve_demo PLATFORM NAME runs PLATFORM's simulator with the bench dataset
# in $work/NAME and waits for its environment file, $work/NAME.env.
serve_demo() {
	"$BIN" demo --platform "$1" --serve-only --dataset bench --data-dir "$work/$2" --env-file "$work/$2.env" \
		--log-level warn 2>"$work/$2.log" &
	pids+=($!)
	for _ in $(seq 600); do [[ -s $work/$2.env ]] && break; sleep 0.1; done
	[[ -s $work/$2.env ]] || { cat "$work/$2.log" >&2; exit 1; }
}
# demo_env NAME KEY is VMEXPORTFS_DEMO_KEY of serve_demo NAME's environment.
demo_env() { sed -n "s/^VMEXPORTFS_DEMO_$2=//p" "$work/$1.env"; }

echo "bench: generating data (1.5 GiB written into the simulator) ..." >&2
serve_demo coriolis sim
# shellcheck disable=SC1091
source "$work/sim.env"
url=$VMEXPORTFS_DEMO_URL
ca=$VMEXPORTFS_DEMO_CA

# A token for the raw-HTTP clients; headers go through files, never argv.
printf '{"username":"%s","password":"%s"}' "$VMEXPORTFS_DEMO_USER" "$(cat "$VMEXPORTFS_DEMO_PASSWORD_FILE")" >"$work/login.json"
token=$(curl -sS --cacert "$ca" -H 'Content-Type: application/json' --data @"$work/login.json" \
	"$url/api/v1/auth/login" | sed -n 's/.*"token" *: *"\([^"]*\)".*/\1/p')
[[ -n $token ]] || { echo "bench: login failed" >&2; exit 1; }
printf 'Authorization: Bearer %s\n' "$token" >"$work/auth.header"
snap() { curl -sS --cacert "$ca" -H @"$work/auth.header" "$url/api/v1/vms/$1" |
	sed -n 's/.*"snapshots" *: *\[ *"\([^"]*\)".*/\1/p'; }
sparse_sid=$(snap sparse)
# The sparse VM's second snapshot rewrote 5% of the disk.
delta_sid=$(curl -sS --cacert "$ca" -H @"$work/auth.header" "$url/api/v1/vms/sparse" |
	sed -n 's/.*"snapshots" *: *\[ *"[^"]*" *, *"\([^"]*\)".*/\1/p')
full_sid=$(snap full)
sparse_url="$url/api/v1/vms/sparse/snapshots/$sparse_sid/disks/sparse.img"
full_url="$url/api/v1/vms/full/snapshots/$full_sid/disks/full.img"

# The extents of the sparse disk, from the snapshot's chunk map.
curl -sS --cacert "$ca" -H @"$work/auth.header" "$url/api/v1/vms/sparse/snapshots/$sparse_sid" |
	grep -o '"start":[0-9]*,"length":[0-9]*' | sed 's/"start":\([0-9]*\),"length":\([0-9]*\)/\1 \2/' >"$work/extents"
written=$(awk '{ n += $2 } END { print n }' "$work/extents")
full_size=$((1 << 30))

declare -a rows
row() { rows+=("| $1 | $2 | $3 | $4 |"); }
declare -a grows drows
grow() { grows+=("| $1 | $2 | $3 | $4 |"); }
drow() { drows+=("| $1 | $2 | $(($3 / 1048576)) | $4 |"); }

# 1. The wire: curl of exactly the written extents, one connection. One
# transfer per extent, each with all its options: without "next" curl gives
# every URL the last range, and options before a "next" do not carry over it.
: >"$work/curl.cfg"
while read -r off len; do
	[[ -s $work/curl.cfg ]] && echo next >>"$work/curl.cfg"
	printf 'silent\nshow-error\nfail\ncacert = "%s"\nheader = "@%s"\nurl = "%s"\nrange = "%d-%d"\noutput = "/dev/null"\n' \
		"$ca" "$work/auth.header" "$sparse_url" "$off" $((off + len - 1)) >>"$work/curl.cfg"
done <"$work/extents"
t0=$(now)
curl -K "$work/curl.cfg"
t1=$(now)
wire_sparse=$(secs "$t0" "$t1")
row "curl, written extents of sparse (the wire)" "$wire_sparse" "$(mbps "$written" "$wire_sparse")" "1.00"

t0=$(now)
curl -sS --fail --cacert "$ca" -H @"$work/auth.header" -o /dev/null "$full_url"
t1=$(now)
wire_full=$(secs "$t0" "$t1")
row "curl, full (1 GiB written)" "$wire_full" "$(mbps $full_size "$wire_full")" "1.00"

# 2. vmexportfs.
mnt=$work/mnt
mkdir -p "$mnt"
"$BIN" --username "$VMEXPORTFS_DEMO_USER" --password-file "$VMEXPORTFS_DEMO_PASSWORD_FILE" \
	--ca-file "$ca" --state-dir "$work/state" --cache-dir "$work/cache" --log-file "$work/mount.log" \
	"coriolis+$url" "$mnt"
mounts+=("$mnt")
daemon=$(pgrep -f -- "$BIN .*$mnt\$" | head -1)

drop_caches
t0=$(now)
cp --sparse=always "$mnt/vms/sparse/snapshots/$sparse_sid/disk.img" "$work/copy.img"
t1=$(now)
cp_sparse=$(secs "$t0" "$t1")
row "vmexportfs cp --sparse=always, sparse" "$cp_sparse" "$(mbps "$written" "$cp_sparse")" "$(ratio "$cp_sparse" "$wire_sparse")"
rm -f "$work/copy.img"

drop_caches
t0=$(now)
dd if="$mnt/vms/full/snapshots/$full_sid/disk.img" of=/dev/null bs=1M status=none
t1=$(now)
dd_full=$(secs "$t0" "$t1")
row "vmexportfs dd bs=1M, full" "$dd_full" "$(mbps $full_size "$dd_full")" "$(ratio "$dd_full" "$wire_full")"
rss_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$daemon/status")

# 3. Derived views. gzip: against gzip -1 and pigz -1 of the same raw bytes
# on local disk, MB/s of raw (logical) bytes. Delta: bytes the daemon read
# from the network (rchar, so TLS framing included) and seconds, against
# copying the whole disk.img of the same snapshot.
rx() { awk '/^rchar/ { print $2 }' "/proc/$daemon/io"; }
disk_size=$((2 << 30))
cp --sparse=always "$mnt/vms/sparse/snapshots/$sparse_sid/disk.img" "$work/raw.img"
drop_caches
t0=$(now)
gzip -1 -c "$work/raw.img" >/dev/null
t1=$(now)
gzip_t=$(secs "$t0" "$t1")
grow "gzip -1 -c, local raw file" "$gzip_t" "$(mbps $disk_size "$gzip_t")" "1.00"
if command -v pigz >/dev/null; then
	drop_caches
	t0=$(now)
	pigz -1 -c "$work/raw.img" >/dev/null
	t1=$(now)
	t=$(secs "$t0" "$t1")
	grow "pigz -1 -c, local raw file" "$t" "$(mbps $disk_size "$t")" "$(ratio "$t" "$gzip_t")"
fi
rm -f "$work/raw.img"
gz=$mnt/vms/sparse/snapshots/$sparse_sid/disk.img.gz
drop_caches
t0=$(now)
cp "$gz" "$work/copy.gz"
t1=$(now)
t=$(secs "$t0" "$t1")
grow "vmexportfs cp disk.img.gz, cold (first stat builds the index)" "$t" "$(mbps $disk_size "$t")" "$(ratio "$t" "$gzip_t")"
rm -f "$work/copy.gz"
drop_caches
t0=$(now)
cp "$gz" "$work/copy.gz"
t1=$(now)
t=$(secs "$t0" "$t1")
grow "vmexportfs cp disk.img.gz, index known" "$t" "$(mbps $disk_size "$t")" "$(ratio "$t" "$gzip_t")"
gzip -t "$work/copy.gz" || { echo "bench: disk.img.gz failed gzip -t" >&2; exit 1; }
rm -f "$work/copy.gz"

snapdir=$mnt/vms/sparse/snapshots/$delta_sid
fusermount3 -u "$mnt"
"$BIN" --username "$VMEXPORTFS_DEMO_USER" --password-file "$VMEXPORTFS_DEMO_PASSWORD_FILE" \
	--ca-file "$ca" --state-dir "$work/state" --cache-dir "$work/cache" --log-file "$work/mount.log" \
	"coriolis+$url" "$mnt"
daemon=$(pgrep -f -- "$BIN .*$mnt\$" | head -1)
drop_caches
r0=$(rx)
t0=$(now)
cp --sparse=always "$snapdir/disk.img" "$work/whole.img"
t1=$(now)
whole_t=$(secs "$t0" "$t1")
whole_rx=$(($(rx) - r0))
drow "vmexportfs cp --sparse=always disk.img of the 5%-changed snapshot" "$whole_t" "$whole_rx" "1.00"
rm -f "$work/whole.img"
r0=$(rx)
t0=$(now)
cp "$snapdir/delta-from-$sparse_sid.vhd" "$work/delta.vhd"
t1=$(now)
t=$(secs "$t0" "$t1")
delta_rx=$(($(rx) - r0))
drow "vmexportfs cp delta-from-<base>.vhd (5% changed)" "$t" "$delta_rx" "$(ratio "$t" "$whole_t")"
changed=$(getfattr --only-values -n "user.vmexport.changed.$sparse_sid" "$snapdir/disk.img" | awk '{ n += $2 } END { print n }')
rm -f "$work/delta.vhd"

# 3. Peers, where installed: they fetch every byte, holes included.
if command -v rclone >/dev/null; then
	# rclone's http backend needs an HTML listing; benchlisting serves one
	# link and forwards the reads (Range and token) to the same disk route.
	go build -o "$work/benchlisting" ./scripts/benchlisting
	"$work/benchlisting" "$sparse_url" "$ca" "$work/auth.header" "$work/listing.url" 2>"$work/listing.log" &
	pids+=($!)
	for _ in $(seq 100); do [[ -s $work/listing.url ]] && break; sleep 0.1; done
	rmnt=$work/rclone
	mkdir -p "$rmnt"
	RCLONE_HTTP_URL=$(cat "$work/listing.url") rclone mount ":http:" "$rmnt" --read-only --vfs-cache-mode off \
		--daemon --daemon-wait 10s 2>"$work/rclone.log" || true
	if mountpoint -q "$rmnt" && [[ -e $rmnt/sparse.img ]]; then
		mounts+=("$rmnt")
		drop_caches
		t0=$(now)
		cp --sparse=always "$rmnt/sparse.img" "$work/rclone.img"
		t1=$(now)
		t=$(secs "$t0" "$t1")
		row "rclone mount :http: (via listing shim), cp --sparse=always, sparse" "$t" "$(mbps "$written" "$t")" "$(ratio "$t" "$wire_sparse")"
		rclone_sparse=$t
		rm -f "$work/rclone.img"
	else
		echo "bench: rclone mount did not expose the disk (see $work/rclone.log); row skipped" >&2
	fi
fi
if command -v nbdkit >/dev/null && command -v nbdfuse >/dev/null; then
	printf '#!/bin/sh\ncat %q\n' "$work/auth.header" >"$work/header.sh"
	chmod 700 "$work/header.sh"
	nmnt=$work/nbd
	mkdir -p "$nmnt"
	nbdfuse "$nmnt" --command nbdkit -s -r curl url="$sparse_url" cainfo="$ca" \
		header-script="$work/header.sh" 2>"$work/nbd.log" &
	pids+=($!)
	for _ in $(seq 100); do [[ -e $nmnt/nbd ]] && break; sleep 0.1; done
	if [[ -e $nmnt/nbd ]]; then
		mounts+=("$nmnt")
		t0=$(now)
		cp --sparse=always "$nmnt/nbd" "$work/nbd.img"
		t1=$(now)
		t=$(secs "$t0" "$t1")
		row "nbdkit curl + nbdfuse, cp --sparse=always, sparse" "$t" "$(mbps "$written" "$t")" "$(ratio "$t" "$wire_sparse")"
		nbdfuse_sparse=$t
		rm -f "$work/nbd.img"
	else
		echo "bench: nbdfuse did not come up (see $work/nbd.log); row skipped" >&2
	fi
fi

# 4. XenServer: the same sparse disk over NBD. The admin's tool would be
# qemu-img convert from an NBD export; qemu-img cannot read from xapi-nbd
# itself (it sends NBD_OPT_LIST, which xapi-nbd refuses), so the reference
# is qemu-img convert from qemu-nbd serving the simulator's own file of
# that snapshot disk (block status on, so qemu-img skips the holes too),
# against vmexportfs reading the simulator's xapi-nbd (TLS, no block
# status: holes from the VHD block table).
declare -a xrows
xrow() { xrows+=("| $1 | $2 | $3 | $4 |"); }
if command -v qemu-nbd >/dev/null; then
	echo "bench: XenServer simulator (same bench dataset) ..." >&2
	serve_demo xapi xsim
	xurl=$(demo_env xsim URL)
	xca=$(demo_env xsim CA)
	xuser=$(demo_env xsim USER)
	xpw=$(demo_env xsim PASSWORD_FILE)
	xfile=$(demo_env xsim SNAPSHOT_FILES | tr ' ' '\n' | sed -n 's/^sparse-1:sparse.img://p')
	[[ -f $xfile ]] || { echo "bench: no simulator file for sparse-1" >&2; exit 1; }
	qemu-nbd -r -f raw -x sparse -p 10899 -b 127.0.0.1 -t -e 8 "$xfile" 2>"$work/qemu-nbd.log" &
	pids+=($!)
	for _ in $(seq 100); do qemu-img info nbd://127.0.0.1:10899/sparse >/dev/null 2>&1 && break; sleep 0.1; done
	drop_caches
	t0=$(now)
	qemu-img convert -f raw -O raw -S 4k nbd://127.0.0.1:10899/sparse "$work/qemu.img"
	t1=$(now)
	qemu_t=$(secs "$t0" "$t1")
	xrow "qemu-img convert -O raw from qemu-nbd (block status), sparse" "$qemu_t" "$(mbps "$written" "$qemu_t")" "1.00"
	want=$(sha256sum <"$work/qemu.img" | cut -d' ' -f1)
	rm -f "$work/qemu.img"
	xmnt=$work/xmnt
	mkdir -p "$xmnt"
	"$BIN" --username "$xuser" --password-file "$xpw" --ca-file "$xca" --state-dir "$work/xstate" \
		--cache-dir "$work/xcache" --log-file "$work/xmount.log" "xapi+$xurl" "$xmnt"
	mounts+=("$xmnt")
	drop_caches
	t0=$(now)
	cp --sparse=always "$xmnt/by-name/sparse/snapshots/sparse-1/disk.img" "$work/xcopy.img"
	t1=$(now)
	t=$(secs "$t0" "$t1")
	xrow "vmexportfs cp --sparse=always over xapi-nbd (TLS, 4 connections), sparse" "$t" "$(mbps "$written" "$t")" "$(ratio "$t" "$qemu_t")"
	got=$(sha256sum <"$work/xcopy.img" | cut -d' ' -f1)
	[[ $got == "$want" ]] || { echo "bench: XenServer copy differs from qemu-img's" >&2; exit 1; }
	rm -f "$work/xcopy.img"
	fusermount3 -u "$xmnt"
fi

# 5. oVirt: the same sparse disk through an image transfer. The reference
# is what an admin would run instead, the imageio client's algorithm
# (scripts/imageio-download.py: extents once, 4 workers, requests of at
# most 128 MiB), on a transfer it creates through the engine with curl.
declare -a orows
orow() { orows+=("| $1 | $2 | $3 | $4 |"); }
if command -v python3 >/dev/null && command -v jq >/dev/null; then
	echo "bench: oVirt simulator (same bench dataset) ..." >&2
	serve_demo ovirt osim
	ourl=$(demo_env osim URL)
	oca=$(demo_env osim CA)
	ouser=$(demo_env osim USER)
	opw=$(demo_env osim PASSWORD_FILE)
	api=$ourl/ovirt-engine/api
	# The SSO form holds the password: a file, never argv.
	(umask 077; jq -rn --arg u "$ouser" --rawfile p "$opw" \
		'"grant_type=password&scope=ovirt-app-api&username=\($u|@uri)&password=\($p|rtrimstr("\n")|@uri)"' >"$work/sso.form")
	otoken=$(curl -sS --cacert "$oca" -H 'Accept: application/json' --data @"$work/sso.form" \
		"$ourl/ovirt-engine/sso/oauth/token" | jq -r .access_token)
	(umask 077; printf 'Authorization: Bearer %s\nVersion: 4\nAccept: application/json\nContent-Type: application/json\n' "$otoken" >"$work/oauth.header")
	ocurl() { curl -sS --fail --cacert "$oca" -H @"$work/oauth.header" "$@"; }
	osid=$(ocurl "$api/vms/sparse/snapshots" | jq -r '.snapshot[] | select(.description == "sparse-1") | .id')
	oimage=$(ocurl "$api/vms/sparse/snapshots/$osid/disks" | jq -r '.disk[0].image_id')
	drop_caches
	t0=$(now)
	otid=$(ocurl -d "{\"snapshot\":{\"id\":\"$oimage\"},\"direction\":\"download\",\"format\":\"raw\"}" "$api/imagetransfers" | jq -r .id)
	turl=
	for _ in $(seq 600); do
		turl=$(ocurl "$api/imagetransfers/$otid" | jq -r 'select(.phase == "transferring") | .transfer_url // empty')
		[[ -n $turl ]] && break
		sleep 0.05
	done
	python3 scripts/imageio-download.py "$turl" "$oca" "$work/imageio.img"
	ocurl -X POST -d '{}' "$api/imagetransfers/$otid/finalize" >/dev/null
	t1=$(now)
	imageio_t=$(secs "$t0" "$t1")
	orow "imageio client algorithm (python, 4 workers, extents once), sparse" "$imageio_t" "$(mbps "$written" "$imageio_t")" "1.00"
	owant=$(sha256sum <"$work/imageio.img" | cut -d' ' -f1)
	rm -f "$work/imageio.img"
	omnt=$work/omnt
	mkdir -p "$omnt"
	"$BIN" --username "$ouser" --password-file "$opw" --ca-file "$oca" --state-dir "$work/ostate" \
		--cache-dir "$work/ocache" --log-file "$work/omount.log" "ovirt+$ourl" "$omnt"
	mounts+=("$omnt")
	drop_caches
	t0=$(now)
	cp --sparse=always "$omnt/by-name/sparse/snapshots/sparse-1/disk.img" "$work/ocopy.img"
	t1=$(now)
	t=$(secs "$t0" "$t1")
	orow "vmexportfs cp --sparse=always through an image transfer (4 connections), sparse" "$t" "$(mbps "$written" "$t")" "$(ratio "$t" "$imageio_t")"
	ogot=$(sha256sum <"$work/ocopy.img" | cut -d' ' -f1)
	[[ $ogot == "$owant" ]] || { echo "bench: oVirt copy differs from the imageio client's" >&2; exit 1; }
	rm -f "$work/ocopy.img"
	fusermount3 -u "$omnt"
fi

# 6. A QCOW2 object in a real S3 server (versitygw, from the tests' own
# module): 2 GiB with 512 MiB written. The reference is what a user does
# today: download the object, then qemu-img convert it locally.
declare -a srows
srow() { srows+=("| $1 | $2 | $3 | $4 |"); }
if command -v openssl >/dev/null && command -v qemu-io >/dev/null; then
	echo "bench: S3 (versitygw) with a 2 GiB QCOW2 object ..." >&2
	vgw=$(cd backend/s3/s3test/gateway && GOWORK=off GOFLAGS= go tool -n github.com/versity/versitygw/cmd/versitygw)
	sdir=$work/s3
	mkdir -p "$sdir/root/vmimages"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
		-addext subjectAltName=IP:127.0.0.1 -keyout "$sdir/key.pem" -out "$sdir/cert.pem" 2>/dev/null
	sak=RS3BENCHACCESSKEY001
	ssk=$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
	(umask 077; printf '%s\n' "$sak" >"$sdir/ak"; printf '%s\n' "$ssk" >"$sdir/sk"; printf 'user = "%s:%s"\n' "$sak" "$ssk" >"$sdir/curl.cfg")
	ROOT_ACCESS_KEY_ID=$sak ROOT_SECRET_ACCESS_KEY=$ssk "$vgw" --port 127.0.0.1:17070 --region cn-east-2 \
		--cert "$sdir/cert.pem" --key "$sdir/key.pem" --keep-alive --quiet posix "$sdir/root" >"$sdir/vgw.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do curl -s -o /dev/null --cacert "$sdir/cert.pem" https://127.0.0.1:17070/ && break; sleep 0.1; done
	s3curl() { curl -sS --fail --cacert "$sdir/cert.pem" -K "$sdir/curl.cfg" --aws-sigv4 "aws:amz:cn-east-2:s3" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
	qemu-img create -q -f qcow2 "$sdir/bench.qcow2" 2G
	for i in $(seq 0 63); do echo "write -P $((i % 250 + 1)) $((i * 32))M 8M"; done | qemu-io "$sdir/bench.qcow2" >/dev/null
	s3curl -T "$sdir/bench.qcow2" https://127.0.0.1:17070/vmimages/bench.qcow2 >/dev/null
	rm -f "$sdir/bench.qcow2"
	drop_caches
	t0=$(now)
	s3curl -o "$sdir/dl.qcow2" https://127.0.0.1:17070/vmimages/bench.qcow2
	qemu-img convert -f qcow2 -O raw "$sdir/dl.qcow2" "$sdir/ref.raw"
	t1=$(now)
	s3ref=$(secs "$t0" "$t1")
	srow "download the object (curl) + qemu-img convert -O raw locally" "$s3ref" "$(mbps $((512 << 20)) "$s3ref")" "1.00"
	swant=$(sha256sum <"$sdir/ref.raw" | cut -d' ' -f1)
	rm -f "$sdir/dl.qcow2" "$sdir/ref.raw"
	smnt=$work/smnt
	mkdir -p "$smnt"
	"$BIN" --s3-access-key-file "$sdir/ak" --s3-secret-key-file "$sdir/sk" --s3-region cn-east-2 --ca-file "$sdir/cert.pem" \
		--state-dir "$work/sstate" --cache-dir "$work/scache" --log-file "$work/smount.log" \
		"s3+https://127.0.0.1:17070/vmimages" "$smnt"
	mounts+=("$smnt")
	drop_caches
	t0=$(now)
	cp --sparse=always "$smnt/by-name/bench.qcow2/snapshots/bench.qcow2/disk.img" "$sdir/copy.raw"
	t1=$(now)
	t=$(secs "$t0" "$t1")
	srow "vmexportfs cp --sparse=always of the QCOW2 object (Range GETs through the qcow2 reader)" "$t" "$(mbps $((512 << 20)) "$t")" "$(ratio "$t" "$s3ref")"
	sgot=$(sha256sum <"$sdir/copy.raw" | cut -d' ' -f1)
	[[ $sgot == "$swant" ]] || { echo "bench: the S3 copy differs from qemu-img's" >&2; exit 1; }
	rm -f "$sdir/copy.raw"
	fusermount3 -u "$smnt"
fi

echo
echo "| what | seconds | MB/s (written bytes) | × reference |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo
echo "| gzip view | seconds | MB/s (raw bytes) | × gzip -1 time |"
echo "|---|---|---|---|"
printf '%s\n' "${grows[@]}"
echo
echo "| delta view | seconds | MiB read from network | × whole-disk time |"
echo "|---|---|---|---|"
printf '%s\n' "${drows[@]}"
if ((${#srows[@]})); then
	echo
	echo "| S3 (QCOW2 object) | seconds | MB/s (written bytes) | × download + convert time |"
	echo "|---|---|---|---|"
	printf '%s\n' "${srows[@]}"
fi
if ((${#orows[@]})); then
	echo
	echo "| oVirt (imageio) | seconds | MB/s (written bytes) | × imageio client time |"
	echo "|---|---|---|---|"
	printf '%s\n' "${orows[@]}"
fi
if ((${#xrows[@]})); then
	echo
	echo "| XenServer (NBD) | seconds | MB/s (written bytes) | × qemu-img time |"
	echo "|---|---|---|---|"
	printf '%s\n' "${xrows[@]}"
fi
echo
echo "changed bytes (user.vmexport.changed): $((changed / 1048576)) MiB; delta read / changed: $(ratio "$delta_rx" "$changed")"
echo "written bytes of sparse: $written of $((2 << 30)); vmexportfs peak RSS: $((rss_kib / 1024)) MiB"
echo "targets: cp --sparse ≤ 1.2 × wire: $(ratio "$cp_sparse" "$wire_sparse");" \
	"dd ≥ 1.3 × wire MB/s: $(ratio "$wire_full" "$dd_full");" \
	"rclone / vmexportfs ≥ 10: ${rclone_sparse:+$(ratio "$rclone_sparse" "$cp_sparse")};" \
	"nbdfuse / vmexportfs ≥ 10: ${nbdfuse_sparse:+$(ratio "$nbdfuse_sparse" "$cp_sparse")}"
