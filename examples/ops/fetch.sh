#!/bin/sh
# fetch.sh REF DEST: bring a build from the shared artifact store to this machine and check it
# out into DEST, which must be absent or an empty directory.
#
# The build is first pulled into this machine's own casframe store, its cache
# (~/.cache/casframe/store, or $CASFRAME_STORE): only the files the cache does not hold yet are
# downloaded, and every one is verified against its digest. DEST then gets read-only hardlinks
# into the cache, which cost no space and no copying.
#
# Environment:
#   FETCH_COPY=1      copy the files into DEST instead of hardlinking them (writable files,
#                     or a DEST on another file system than the cache)
#   ARTIFACT_STORE, CASFRAME, CASFRAME_CONFIG, AWS_*: see common.sh and README.md
set -eu

prog=fetch
usage="fetch.sh REF DEST"
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

[ $# -eq 2 ] || usage_error
ref=$1
dest=$2

# Refuse a used destination before the download, not after it.
if [ -e "$dest" ]; then
    [ -d "$dest" ] || die "$dest exists and is not a directory"
    [ -z "$(ls -A -- "$dest")" ] || die "$dest is not empty: remove it or choose another DEST"
fi

info "pulling $ref from $ARTIFACT_STORE"
"$CASFRAME" pull "$ref" --from "$ARTIFACT_STORE" \
    || die "could not pull $ref from $ARTIFACT_STORE (casframe's message is above)"

if [ "${FETCH_COPY:-0}" = 1 ]; then
    set -- --copy
else
    set --
fi
"$CASFRAME" checkout "$@" "$ref" "$dest" \
    || die "could not check $ref out into $dest (casframe's message is above)"
info "checked out $ref into $dest"
