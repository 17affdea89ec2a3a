# shellcheck shell=sh disable=SC2154  # prog and usage are set by the sourcing script
# Shared by the scripts of this folder, which source it after setting `prog` and `usage`;
# not a command of its own. Settings every script reads (all optional):
#
#   CASFRAME         the casframe command (default: casframe, found on PATH)
#   ARTIFACT_STORE   the shared store: a name from casframe's configuration file, or a URL
#                    (default: artifacts)
#   CASFRAME_CONFIG  casframe's configuration file (read by casframe itself; default:
#                    ~/.config/casframe/config.toml)
#
# AWS credentials come from boto3's usual chain (environment, profile, instance role).

CASFRAME=${CASFRAME:-casframe}
ARTIFACT_STORE=${ARTIFACT_STORE:-artifacts}

# die MESSAGE [STATUS]: say what went wrong, naming the script, and stop (status 1 by default).
die() {
    printf '%s: error: %s\n' "$prog" "$1" >&2
    exit "${2:-1}"
}

# info MESSAGE: a progress line on stderr (stdout is kept for results).
info() {
    printf '%s: %s\n' "$prog" "$1" >&2
}

# usage_error: the command line is wrong; show how to call the script (status 2).
usage_error() {
    die "usage: $usage" 2
}

if ! command -v "$CASFRAME" >/dev/null 2>&1; then
    die "cannot find the casframe command '$CASFRAME': install casframe with S3 support \
(pip install 'casframe[s3]') or set CASFRAME to its path"
fi
