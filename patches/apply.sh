#!/usr/bin/env bash
# Builds target/patched/libunftp-<version>: the pristine crates.io release of libunftp with
# patches/libunftp/*.patch applied in name order. Cargo.toml's [patch.crates-io] points there.
#
# The release comes from cargo's own registry cache (`cargo fetch` on patches/pristine), and its
# sha256 must match the checksum in patches/pristine/Cargo.lock. A stamp records the checksum and
# the patch contents, so a second run with nothing changed does no work.
#
# Usage: patches/apply.sh   (from any directory; no arguments)
set -euo pipefail

readonly CRATE=libunftp
readonly VERSION=0.24.0

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pristine_manifest="$root/patches/pristine/Cargo.toml"
pristine_lock="$root/patches/pristine/Cargo.lock"
patch_dir="$root/patches/$CRATE"
out_parent="$root/target/patched"
out_dir="$out_parent/$CRATE-$VERSION"
stamp_file="$out_parent/$CRATE-$VERSION.stamp"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"

fail() {
    echo "patches/apply.sh: $*" >&2
    exit 1
}

# Prints the checksum that patches/pristine/Cargo.lock records for $CRATE $VERSION.
locked_checksum() {
    awk -v name="$CRATE" -v version="$VERSION" '
        /^\[\[package\]\]/ { in_crate = 0; in_version = 0 }
        $0 == "name = \"" name "\"" { in_crate = 1 }
        $0 == "version = \"" version "\"" { in_version = 1 }
        in_crate && in_version && /^checksum = / { gsub(/"/, "", $3); print $3; exit }
    ' "$pristine_lock"
}

mkdir -p "$out_parent"

# Serializes concurrent runs (two shells, or make -j), so that neither reads a half-built tree.
exec 9>"$out_parent/.apply.lock"
flock 9

expected_sha="$(locked_checksum)"
[[ "$expected_sha" =~ ^[0-9a-f]{64}$ ]] ||
    fail "no checksum for $CRATE $VERSION in $pristine_lock; run 'cargo generate-lockfile --manifest-path $pristine_manifest' and commit the lock"

shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob

# The stamp covers the release checksum, this script and every patch (name and content), so
# editing, adding, removing or renaming a patch forces a fresh extraction.
stamp="$(
    {
        echo "$CRATE $VERSION $expected_sha"
        sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
        for p in "${patches[@]}"; do
            echo "$(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
)"
if [[ -d "$out_dir" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    echo "patches/apply.sh: $out_dir is up to date (${#patches[@]} patches)"
    exit 0
fi

cargo fetch --locked --manifest-path "$pristine_manifest" >&2 ||
    fail "cargo fetch failed for $pristine_manifest"

crate_file=""
for candidate in "$cargo_home"/registry/cache/*/"$CRATE-$VERSION.crate"; do
    [[ -f "$candidate" ]] || continue
    if [[ "$(sha256sum "$candidate" | cut -d' ' -f1)" == "$expected_sha" ]]; then
        crate_file="$candidate"
        break
    fi
    echo "patches/apply.sh: ignoring $candidate: its sha256 does not match $pristine_lock" >&2
done
[[ -n "$crate_file" ]] ||
    fail "no $CRATE-$VERSION.crate with sha256 $expected_sha under $cargo_home/registry/cache; check CARGO_HOME"

# Build in a scratch directory and move it into place at the end, so a patch that fails to
# apply leaves no half-patched tree for cargo to compile.
work_dir="$(mktemp -d "$out_parent/.work.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT

# -m stamps the files with the current time instead of the archive's fixed 2006 mtime. Without
# it, re-extracting after a patch is removed would leave files older than cargo's last build,
# and cargo would keep the stale patched build.
tar -xzf "$crate_file" -m --no-same-owner -C "$work_dir"
[[ -d "$work_dir/$CRATE-$VERSION" ]] || fail "$crate_file did not contain $CRATE-$VERSION/"

for p in "${patches[@]}"; do
    echo "patches/apply.sh: applying $(basename "$p")" >&2
    patch -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch \
        -d "$work_dir/$CRATE-$VERSION" -i "$p" >&2 ||
        fail "patch $p did not apply cleanly to pristine $CRATE $VERSION"
done

rm -rf "$out_dir"
mv "$work_dir/$CRATE-$VERSION" "$out_dir"
echo "$stamp" >"$stamp_file"
echo "patches/apply.sh: built $out_dir (${#patches[@]} patches)"
