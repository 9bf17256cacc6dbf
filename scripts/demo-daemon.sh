#!/bin/sh
# End-to-end demo of the publisher daemon on this machine:
#   1. creates a signed repository (repo init) under ./demo-daemon,
#   2. starts cvmfs-prepub with config/demo.yaml on 127.0.0.1:8080,
#   3. submits a sample .tar.gz with prepubctl (the same works with curl, see README),
#   4. waits for "published", runs repo check, lists the published path,
#   5. stops the daemon it started (by PID).
set -eu
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
PORT=${PORT:-8080}
export PREPUB_API_TOKEN="${PREPUB_API_TOKEN:-demo-token-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')}"
export PREPUB_URL="http://127.0.0.1:$PORT"
REPO=demo.example.org
STORAGE=demo-daemon/storage/$REPO

if [ ! -f "$STORAGE/.cvmfspublished" ]; then
    "$BIN/cvmfs-prepub" repo init --repo-dir "$STORAGE" --name "$REPO" --keys-dir demo-daemon/keys
fi

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
mkdir -p "$SRC/bin" "$SRC/lib" "$SRC/share/doc"
printf '#!/bin/sh\necho hello from cvmfs\n' > "$SRC/bin/hello"
chmod 755 "$SRC/bin/hello"
ln -s ../lib/libdemo.so "$SRC/bin/libdemo.so"
head -c 12000000 /dev/urandom > "$SRC/lib/libdemo.so"
: > "$SRC/lib/.cvmfscatalog"
echo demo > "$SRC/share/doc/README"
tar -C "$SRC" -czf demo-daemon/sample.tar.gz .

"$BIN/cvmfs-prepub" --config config/demo.yaml --listen "127.0.0.1:$PORT" 2> demo-daemon/daemon.log &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null; rm -rf "$SRC"' EXIT
i=0
until "$BIN/prepubctl" health > /dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 100 ]; then echo "daemon did not start; see demo-daemon/daemon.log" >&2; exit 1; fi
    sleep 0.1
done
"$BIN/prepubctl" health

VERSION="1.0.$(date +%s)"
JOB=$("$BIN/prepubctl" submit demo-daemon/sample.tar.gz --repo "$REPO" --path "/sw/demo/$VERSION" --tag "demo-$VERSION" --wait)
echo "job: $JOB"
"$BIN/prepubctl" show "$(echo "$JOB" | head -n 1)"
"$BIN/cvmfs-prepub" repo check --repo-dir "$STORAGE" --keys-dir demo-daemon/keys
"$BIN/cvmfs-prepub" repo ls --repo-dir "$STORAGE" "/sw/demo/$VERSION"
echo "published; the repository storage is $STORAGE (serve it over HTTP as a Stratum 0)"
