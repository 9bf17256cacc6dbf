#!/bin/sh
# Builds a real repository from a sample tree: repo init, repo ingest of a .tar.gz, repo check,
# repo ls. Usage: scripts/demo-publish.sh [work-dir]   (default: ./demo-repo)
set -eu
BIN="${BIN:-$(dirname "$0")/../target/release/cvmfs-prepub}"
WORK="${1:-./demo-repo}"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC="$WORK/src"
rm -rf "$SRC" "$WORK/storage" "$WORK/storage.keys"
mkdir -p "$SRC/pkg/bin" "$SRC/pkg/lib" "$SRC/pkg/share/doc"
printf '#!/bin/sh\necho hello from cvmfs\n' > "$SRC/pkg/bin/hello"
chmod 755 "$SRC/pkg/bin/hello"
ln -s ../lib/libdemo.so "$SRC/pkg/bin/libdemo.so"
head -c 12000000 /dev/urandom > "$SRC/pkg/lib/libdemo.so"
: > "$SRC/pkg/lib/.cvmfscatalog"
echo "demo" > "$SRC/pkg/share/doc/README"
tar -C "$SRC" -czf "$WORK/sample.tar.gz" .

"$BIN" repo init --repo-dir "$WORK/storage" --name demo.example.org
"$BIN" repo ingest "$WORK/sample.tar.gz" --repo-dir "$WORK/storage" --path /sw/demo/1.0 --tag demo-1.0
"$BIN" repo check --repo-dir "$WORK/storage"
"$BIN" repo ls --repo-dir "$WORK/storage" /sw/demo/1.0/pkg
echo "repository storage: $WORK/storage (serve it over HTTP as a Stratum 0); keys: $WORK/storage.keys"
