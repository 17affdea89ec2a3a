#!/bin/sh
# ci-push.sh DIRECTORY: store a CI build's output directory in the shared artifact store.
#
# The directory goes straight into the store (the S3 bucket): files the bucket already holds,
# from earlier builds, are not uploaded again, and the ref is set only once the whole tree is
# there. Prints the tree's digest (HASH/SIZE) on stdout.
#
# Environment:
#   BRANCH, BUILD_ID  the branch built and the CI's build number or id: the ref is
#                     ci/$BRANCH/$BUILD_ID (BRANCH may contain '/': ci/feature/login/1042)
#   REF               set this ref instead, e.g. REF=release/$TAG in a tag pipeline
#   ARTIFACT_STORE, CASFRAME, CASFRAME_CONFIG, AWS_*: see common.sh and README.md
set -eu

prog=ci-push
usage="ci-push.sh DIRECTORY  (with BRANCH and BUILD_ID, or REF, in the environment)"
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

[ $# -eq 1 ] || usage_error
directory=$1
[ -d "$directory" ] || die "$directory: no such directory (the build output to store)"

if [ -z "${REF:-}" ]; then
    [ -n "${BRANCH:-}" ] || die "BRANCH is not set: name the branch that was built (or set REF)"
    [ -n "${BUILD_ID:-}" ] || die "BUILD_ID is not set: give the CI's build number (or set REF)"
    REF="ci/$BRANCH/$BUILD_ID"
fi

info "storing $directory as $REF in $ARTIFACT_STORE"
"$CASFRAME" --store "$ARTIFACT_STORE" import "$directory" --ref "$REF" \
    || die "could not store $directory as $REF in $ARTIFACT_STORE (casframe's message is above)"
info "stored $REF"
