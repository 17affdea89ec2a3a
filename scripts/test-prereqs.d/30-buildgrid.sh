# BuildGrid, an independent REAPI server (tests/test_grpc_buildgrid.py), in a virtualenv of its
# own: it carries its own copies of the REAPI protos, which would clash with casframe's in one
# process. The venv is $CASFRAME_PREREQS/buildgrid (or $CASFRAME_BUILDGRID_VENV); its
# .casframe-installed names the release.
#
# BuildGrid's 0.9 releases need Python 3.13, so the venv uses the newest Python here and the
# newest release installable on it (its Requires-Python); 0.4.4 is the last one for 3.11.
buildgrid_for() {
    case "$1" in
        3.11) echo "buildgrid==0.4.4" ;;
        3.12) echo "buildgrid==0.8.16" ;;
        3.13 | 3.1[4-9] | 3.[2-9]?) echo "buildgrid==0.9.1" ;;
        *) return 1 ;;
    esac
}

venv="${CASFRAME_BUILDGRID_VENV:-$CASFRAME_PREREQS/buildgrid}"
stamp="$venv/.casframe-installed"
# Already there: checked against the venv's own Python, without probing every interpreter.
if [ -x "$venv/bin/bgd" ] && [ -f "$stamp" ]; then
    have=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
        || true)
    if [ -n "$have" ] && [ "$(buildgrid_for "$have" || true)" = "$(cat "$stamp")" ]; then
        return 0
    fi
fi

read -r python version < <(prereqs_newest_python)
requirement=$(buildgrid_for "$version") \
    || prereqs_fail "BuildGrid needs Python 3.11 or newer; the newest here is $version"
prereqs_say "installing $requirement into $venv (Python $version)"
rm -rf "$venv"
"$python" -m venv "$venv"
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$requirement"; then
    rm -rf "$venv"
    prereqs_fail "could not install $requirement into $venv"
fi
[ -x "$venv/bin/bgd" ] || prereqs_fail "$requirement installed into $venv but has no bin/bgd"
echo "$requirement" > "$stamp"
