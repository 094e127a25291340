# Shell functions the scripts share (sourced, not run).

# as_root "$0" "$@": re-runs the calling script as root when it is not (through sudo where
# there is one; fresh Debian has no sudo, so otherwise it says how to become root).
as_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    local self=$1
    shift
    if command -v sudo >/dev/null 2>&1; then
        echo "$(basename "$self"): needs root (network namespaces, packages); re-running with sudo" >&2
        exec sudo -E -- env "PATH=$PATH" "$self" "$@"
    fi
    echo "$(basename "$self"): needs root (network namespaces, packages) and there is no sudo here;" >&2
    local line=$self
    [ $# -eq 0 ] || line="$self $*"
    echo "  run it as root, e.g.: su -c '$line'" >&2
    exit 2
}

# apt_get ARGS...: apt-get that waits (up to 10 minutes) for another apt or dpkg run to
# release its locks instead of failing with "Could not get lock".
apt_get() {
    local deadline=$((SECONDS + 600)) err rc
    err=$(mktemp)
    while :; do
        rc=0
        apt-get -o DPkg::Lock::Timeout=600 "$@" 2> "$err" || rc=$?
        if [ "$rc" -ne 0 ] && grep -qE 'Could not get lock|Unable to lock|is another process using it' "$err" \
            && [ "$SECONDS" -lt "$deadline" ]; then
            echo "apt-get: another apt or dpkg run holds the package locks; waiting for it" >&2
            sleep 5
            continue
        fi
        cat "$err" >&2
        rm -f "$err"
        return "$rc"
    done
}
