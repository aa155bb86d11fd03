#!/usr/bin/env bash
# Fetch the OHIF viewer's published build (@ohif/app, MIT licence, kept beside it) into var/ohif/
# (or $1). Setup time only: radai never downloads at run time. The version and the tarball's
# sha512 are pinned here; a mismatch stops. Source maps are left out (about 40 MB nobody serves).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.13.2
SHA512=WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
URL="https://registry.npmjs.org/@ohif/app/-/app-$VERSION.tgz"
DEST=${1:-var/ohif}

if [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$VERSION" ] && [ -f "$DEST/dist/index.html" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "setup: fetching OHIF $VERSION"
if command -v npm >/dev/null 2>&1; then
  (cd "$work" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
  mv "$work"/ohif-app-"$VERSION".tgz "$work/ohif.tgz"
else
  curl -fsSL "$URL" -o "$work/ohif.tgz"
fi
got=$(openssl dgst -sha512 -binary "$work/ohif.tgz" | base64 -w0)
if [ "$got" != "$SHA512" ]; then
  echo "setup: OHIF tarball sha512 $got is not the pinned $SHA512" >&2
  exit 1
fi
tar -xzf "$work/ohif.tgz" -C "$work" --exclude='*.map' package/dist package/LICENSE
rm -rf "$DEST.new"
mkdir -p "$DEST.new"
mv "$work/package/dist" "$work/package/LICENSE" "$DEST.new/"
echo "$VERSION" > "$DEST.new/VERSION"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
