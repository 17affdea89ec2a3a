#!/bin/sh
# nightly-gc.sh: keep the shared artifact store under its quota, and report its usage.
#
# When the store holds more than GC_MAX_SIZE, `casframe gc` deletes the least recently used
# refs (never one matching GC_KEEP) until what remains would fit in 80% of the quota, then
# deletes every blob no ref reaches any more. `casframe du` then prints the store's size and
# what each ref alone keeps. Exits with status 1 when the store cannot get under its quota
# (what is left is kept by GC_KEEP or is younger than GC_GRACE), when fsck finds a problem, or
# on any error; 2 for a bad setting.
#
# Environment:
#   GC_MAX_SIZE   the quota (default 50G; binary units: 500M, 50G, 1.5T)
#   GC_KEEP       refs never expired: shell patterns separated by spaces (default 'release/*';
#                 empty to protect none)
#   GC_GRACE      blobs younger than this are never deleted, so that uploads in progress lose
#                 nothing; longer than the longest CI upload (default 1h)
#   GC_FSCK=1     also verify every blob and every ref's tree after gc (reads the whole store)
#   GC_METRICS_PUSH  a Prometheus Pushgateway URL: push what gc freed, its duration and the
#                 time it last succeeded there (job casframe_gc)
#   ARTIFACT_STORE, CASFRAME, CASFRAME_CONFIG, AWS_*: see common.sh and README.md
set -eu

prog=nightly-gc
usage="nightly-gc.sh  (settings in the environment: GC_MAX_SIZE, GC_KEEP, GC_GRACE, GC_FSCK, GC_METRICS_PUSH)"
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

[ $# -eq 0 ] || usage_error
max_size=${GC_MAX_SIZE:-50G}
grace=${GC_GRACE:-1h}
keep=${GC_KEEP-release/*}

set -f  # the patterns are casframe's to match against ref names, not the shell's
set --
for pattern in $keep; do
    set -- "$@" --keep "$pattern"
done
set +f
if [ -n "${GC_METRICS_PUSH:-}" ]; then
    set -- "$@" --metrics-push "$GC_METRICS_PUSH"
fi

info "gc of $ARTIFACT_STORE: quota $max_size, keeping ${keep:-no refs}, grace $grace"
status=0
"$CASFRAME" --store "$ARTIFACT_STORE" gc --max-size "$max_size" --grace "$grace" "$@" \
    || status=$?
[ "$status" -ne 2 ] || die "bad setting for casframe gc (its message is above)" 2

fsck_status=0
if [ "${GC_FSCK:-0}" = 1 ]; then
    info "verifying every blob and tree of $ARTIFACT_STORE"
    "$CASFRAME" --store "$ARTIFACT_STORE" fsck || fsck_status=$?
fi

du_status=0
"$CASFRAME" --store "$ARTIFACT_STORE" du || du_status=$?

[ "$status" -eq 0 ] \
    || die "gc of $ARTIFACT_STORE failed or could not get under $max_size (see above)"
[ "$du_status" -eq 0 ] || die "du of $ARTIFACT_STORE failed (casframe's message is above)"
[ "$fsck_status" -eq 0 ] \
    || die "fsck found problems in $ARTIFACT_STORE (listed above): see README.md, 'Health'"
info "done"
