# shellcheck shell=bash
# Shared setup for scripts/run, scripts/test and scripts/bench: install what is missing from
# Debian's packages and start a nix-daemon if none answers. Fails loudly; never skips.

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $* (install it by hand, or run as root)"
    fi
}

# ensure_packages CMD:PACKAGE ...: installs PACKAGE where CMD is missing.
ensure_packages() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Packages are installed for their programs: no service they ship (nginx, say) is started.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# Written by hearth scripts/lib.sh while installing packages.\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        added_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$added_policy" = 1 ] && as_root rm -f "$policy"
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || die "${pair%%:*} is still missing after installing ${pair#*:}"
    done
}

ensure_toolchain() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
}

# ensure_free_space DIR GIB: fails unless DIR's file system has GIB GiB free. A build that runs
# out of disk half-way dies in the linker with a bus error, which says nothing about the cause.
ensure_free_space() {
    local dir=$1 want=$2 have
    mkdir -p "$dir"
    have=$(df --output=avail -B1G "$dir" | tail -n1 | tr -d ' ')
    [ "$have" -ge "$want" ] || die "$dir has ${have} GiB free; the build and tests need at least ${want} GiB (earlier runs' builds and test systems are reclaimed by removing target/ and by nix-store --gc)"
}


# Sets Nix up the way Debian's nix-setup-systemd package does (nix-bin alone, as installed with
# --no-install-recommends, leaves this out): the nixbld group with ten build users, the nix-users
# group, and /etc/nix/nix.conf with `sandbox = false`. Idempotent; says what it changed, and sets
# NIX_SETUP_CHANGED=1 so that a daemon started before the change is restarted.
NIX_SETUP_CHANGED=0
ensure_nix_setup() {
    local n nologin
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    if ! getent group nix-users >/dev/null; then
        log "adding group nix-users"
        as_root groupadd --force --system nix-users
        NIX_SETUP_CHANGED=1
    fi
    if ! getent group nixbld >/dev/null; then
        log "adding group nixbld"
        as_root groupadd --force --system nixbld
        NIX_SETUP_CHANGED=1
    fi
    for n in $(seq 1 10); do
        if ! id "nixbld$n" >/dev/null 2>&1; then
            log "adding build user nixbld$n"
            as_root useradd --system --comment "Nix build user $n" --home-dir /var/empty \
                --gid nixbld --groups nixbld --no-user-group --shell "$nologin" "nixbld$n"
            NIX_SETUP_CHANGED=1
        fi
    done
    if [ ! -e /etc/nix/nix.conf ]; then
        log "writing /etc/nix/nix.conf (sandbox = false, as Debian's nix-setup-systemd does)"
        as_root mkdir -p /etc/nix
        printf '# Written by hearth scripts/lib.sh, as nix-setup-systemd would.\nsandbox = false\n' |
            as_root tee /etc/nix/nix.conf >/dev/null
        NIX_SETUP_CHANGED=1
    fi
    getent group nixbld >/dev/null || die "the nixbld group is still missing"
}

# True when a nix-daemon answers on its socket (an invalid path is a daemon's answer).
nix_daemon_answers() {
    local out
    [ -S /nix/var/nix/daemon-socket/socket ] || return 1
    out=$(NIX_REMOTE=daemon timeout 10 nix-store -q --references /nix/store/0000000000000000000000000000000a-x 2>&1) || true
    case "$out" in
        *"cannot connect"* | *"Connection refused"* | *"No such file"* | "") return 1 ;;
    esac
    return 0
}

# Starts nix-daemon in the background unless one answers on the socket.
ensure_nix_daemon() {
    ensure_nix_setup
    if [ "$NIX_SETUP_CHANGED" = 1 ] && pgrep -x nix-daemon >/dev/null; then
        log "restarting nix-daemon to pick up the new setup"
        as_root pkill -x nix-daemon || true
        local j
        for j in $(seq 1 50); do pgrep -x nix-daemon >/dev/null || break; sleep 0.1; done
    fi
    nix_daemon_answers && return 0
    log "starting nix-daemon"
    as_root mkdir -p /nix/var/log
    as_root bash -c 'nohup nix-daemon >>/nix/var/log/hearth-nix-daemon.log 2>&1 </dev/null &'
    local i
    for i in $(seq 1 100); do
        nix_daemon_answers && return 0
        sleep 0.1
    done
    die "nix-daemon did not come up (see /nix/var/log/hearth-nix-daemon.log)"
}

ensure_git_identity() {
    git config --global user.email >/dev/null 2>&1 || git config --global user.email "hearth-tests@localhost"
    git config --global user.name >/dev/null 2>&1 || git config --global user.name "hearth tests"
}

# A Python virtualenv (under target/, so cargo clean removes it) with the official MCP client
# SDK from PyPI, for the MCP tests; exports HEARTH_MCP_PYTHON. Idempotent.
ensure_mcp_client() {
    local venv="${HEARTH_PY_VENV:-$PWD/target/py-mcp}"
    command -v python3 >/dev/null || ensure_packages python3:python3
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "installing python3-venv"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    if ! "$venv/bin/python" -c 'import mcp' >/dev/null 2>&1; then
        log "installing the MCP client SDK (PyPI: mcp) into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'mcp>=1.10,<2' \
            || die "cannot install the MCP client SDK from PyPI"
    fi
    "$venv/bin/python" -c 'import mcp' || die "the MCP client SDK is still missing in $venv"
    export HEARTH_MCP_PYTHON="$venv/bin/python"
}
