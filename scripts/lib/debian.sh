# shellcheck shell=bash
# Shared by the install-* scripts: fetch Debian packages with a private apt source list, lists
# folder and cache, so the system's apt configuration and state are read, never written. The
# mirror comes from this machine's own apt sources (or CFWRAP_DEBIAN_MIRROR); none is named here.

# The first plain Debian archive URI this machine's apt already uses (not security, not a
# third-party repository), from deb822 .sources files or one-line .list files.
debian_mirror() {
    if [ -n "${CFWRAP_DEBIAN_MIRROR:-}" ]; then
        printf '%s\n' "${CFWRAP_DEBIAN_MIRROR%/}"
        return
    fi
    local f candidate
    {
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk '
                /^[[:space:]]*$/ { if (uri != "" && suites !~ /security/) { print uri; exit } uri=""; suites="" }
                /^URIs:/ { uri=$2 }
                /^Suites:/ { suites=$0 }
                END { if (uri != "" && suites !~ /security/) print uri }
            ' "$f"
        done
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            awk '$1 == "deb" && $0 !~ /security/ {
                     for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit }
                 }' "$f"
        done
    } | while read -r candidate; do
        case $candidate in
            */debian | */debian/) printf '%s\n' "${candidate%/}"; break ;;
        esac
    done
}

# This machine's Debian codename (bookworm, trixie, ...).
debian_codename() {
    # shellcheck source=/dev/null
    . /etc/os-release
    printf '%s\n' "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
}

# debian_download SUITE DIR PACKAGE...: download the packages' .deb files into DIR.
debian_download() {
    local suite=$1 dir=$2 mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    shift 2
    mirror=$(debian_mirror)
    if [ -z "$mirror" ]; then
        echo "no Debian archive found in /etc/apt/sources*; set CFWRAP_DEBIAN_MIRROR to a Debian mirror URL" >&2
        return 1
    fi
    if [ ! -f "$keyring" ]; then
        echo "missing $keyring; install the debian-archive-keyring package" >&2
        return 1
    fi
    mkdir -p "$dir/.apt/lists/partial" "$dir/.apt/cache/archives/partial"
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >"$dir/.apt/sources.list"
    local opts=(
        -o "Dir::Etc::SourceList=$dir/.apt/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/.apt/lists"
        -o "Dir::Cache=$dir/.apt/cache"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${opts[@]}" -qq update
    (cd "$dir" && apt-get "${opts[@]}" -qq download "$@")
}
