#!/usr/bin/env bash
# install.sh — install or remove cvmfs-prepub (install guide §10).
#
#   ./install.sh [install] [options]       install or update (default)
#   ./install.sh uninstall [options]       remove
#
# Options:
#   --dry-run            print every action, change nothing
#   --mode MODE          publisher (default), receiver, or all
#   --keep-spool         uninstall: keep /var/spool/cvmfs-prepub (job history, journal)
#   --keep-cas           uninstall: keep the CAS (cas.root from the configuration)
#   --keep-user          uninstall: keep the cvmfs-prepub system account
#   --purge-legacy       also remove the legacy bits-console spool daemon (cvmfs-local-publish)
#   --yes                do not ask for confirmation (uninstall)
#   --root DIR           act on the file tree under DIR instead of / (tests, image builds);
#                        systemctl is not called then
#   -h, --help           this text
#
# Idempotent: a second run changes nothing and says so. Configuration templates are written only
# when absent. Binaries come from ./bin (make build). Exit status 0 on success, 1 if any step
# failed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
action=install
dry=0 mode=publisher keep_spool=0 keep_cas=0 keep_user=0 purge_legacy=0 yes=0 root=""
failed=0 changed=0

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        install | uninstall) action=$1 ;;
        --dry-run) dry=1 ;;
        --mode)
            shift
            mode=${1:-}
            ;;
        --mode=*) mode=${1#--mode=} ;;
        --keep-spool) keep_spool=1 ;;
        --keep-cas) keep_cas=1 ;;
        --keep-user) keep_user=1 ;;
        --purge-legacy) purge_legacy=1 ;;
        --yes | -y) yes=1 ;;
        --root)
            shift
            root=${1:-}
            ;;
        --root=*) root=${1#--root=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument '$1'" >&2
            usage >&2
            exit 1
            ;;
    esac
    shift
done
case "$mode" in publisher | receiver | all) ;; *)
    echo "install.sh: --mode must be publisher, receiver or all" >&2
    exit 1
    ;;
esac
if [ -n "$root" ]; then
    [ -d "$root" ] || { echo "install.sh: --root $root is not a directory" >&2; exit 1; }
    root=$(cd "$root" && pwd)
fi
want_pub() { [ "$mode" = publisher ] || [ "$mode" = all ]; }
want_rcv() { [ "$mode" = receiver ] || [ "$mode" = all ]; }

R() { printf '%s%s' "$root" "$1"; } # a path inside the target tree
say() { printf '%s\n' "$*"; }
act() { # act DESCRIPTION COMMAND...: run (or, with --dry-run, show) one change
    local what=$1
    shift
    changed=$((changed + 1))
    if [ $dry -eq 1 ]; then
        say "would: $what"
        return 0
    fi
    if "$@"; then
        say "done:  $what"
    else
        say "FAILED: $what" >&2
        failed=1
    fi
}
have_systemd() { [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; }

USER_NAME=cvmfs-prepub
BIN=/usr/local/bin
ETC=/etc/cvmfs-prepub
UNITS=/etc/systemd/system

# yaml_get FILE SECTION KEY: the value of "KEY:" inside the top-level "SECTION:" block.
yaml_get() {
    [ -f "$1" ] || return 0
    awk -v sec="$2" -v key="$3" '
        /^[^[:space:]#]/ { insec = ($0 ~ "^" sec ":") }
        insec && $0 ~ "^[[:space:]]+" key ":" {
            v = $0; sub("^[[:space:]]+" key ":[[:space:]]*", "", v); sub("[[:space:]]+#.*$", "", v)
            gsub(/^["'\'']|["'\'']$/, "", v); print v; exit
        }' "$1"
}
# Every "storage:" path of a receiver configuration.
yaml_storages() {
    [ -f "$1" ] || return 0
    awk '/^[[:space:]]+storage:/ { v = $0; sub(/^[[:space:]]+storage:[[:space:]]*/, "", v); sub(/[[:space:]]+#.*$/, "", v); print v }' "$1"
}

pub_spool() { local v; v=$(yaml_get "$(R $ETC/config.yaml)" server spool_root); echo "${v:-/var/spool/cvmfs-prepub}"; }
pub_cas() {
    local v
    v=$(yaml_get "$(R $ETC/config.yaml)" cas root)
    [ -n "$v" ] || v=$(yaml_get "$here/config/config.yaml" cas root)
    echo "${v:-/srv/cvmfs/cas}"
}
rcv_cas() {
    local v
    v=$(yaml_get "$(R $ETC/receiver.yaml)" cas root)
    [ -n "$v" ] || v=$(yaml_get "$here/config/receiver.yaml" cas root)
    echo "${v:-/srv/cvmfs/stratum1/cas}"
}

uid_of() { awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$(R /etc/passwd)" 2>/dev/null; }
gid_of() { awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$(R /etc/group)" 2>/dev/null; }
prefix_args() { [ -n "$root" ] && printf -- '--prefix\n%s\n' "$root"; }

# ensure_file SRC DST MODE: install SRC as DST unless identical.
ensure_file() {
    local src=$1 dst=$2 m=$3
    if [ ! -f "$src" ]; then
        say "FAILED: $src is missing (run 'make build' first)" >&2
        failed=1
        return
    fi
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        if [ "$(stat -c %a "$dst")" != "$m" ]; then act "chmod $m $dst" chmod "$m" "$dst"; fi
        return
    fi
    act "install $dst" install -D -m "$m" "$src" "$dst"
}
# ensure_dir DIR MODE OWNER-UID GROUP-GID [new-only]: with new-only, an existing directory
# (say, a Stratum 0's /srv/cvmfs) keeps its mode and owner.
ensure_dir() {
    local d=$1 m=$2 u=$3 g=$4 new_only=${5:-}
    if [ -d "$d" ] && [ -n "$new_only" ]; then return; fi
    if [ ! -d "$d" ]; then act "create $d" install -d -m "$m" "$d"; fi
    [ $dry -eq 1 ] && [ ! -d "$d" ] && return
    [ "$(stat -c %a "$d" 2>/dev/null)" = "$m" ] || act "chmod $m $d" chmod "$m" "$d"
    ensure_owner "$d" "$u" "$g"
}
# template SRC DST MODE: write a configuration template only if DST is absent.
template() {
    local src=$1 dst=$2 m=$3
    if [ -e "$dst" ]; then return; fi
    act "write template $dst" install -D -m "$m" "$src" "$dst"
}
# ensure_owner PATH UID GID: chown when it differs (and the path exists).
ensure_owner() {
    [ -e "$1" ] && [ -n "$2" ] || return 0
    [ "$(stat -c %u:%g "$1")" = "$2:$3" ] || act "chown $2:$3 $1" chown "$2:$3" "$1"
}
# unit NAME RWPATHS: install the unit with ReadWritePaths set from the configuration.
unit() {
    local name=$1 rw=$2 tmp
    tmp=$(mktemp)
    sed "s|^ReadWritePaths=.*|ReadWritePaths=$rw|" "$here/systemd/$name" >"$tmp"
    ensure_file "$tmp" "$(R $UNITS/$name)" 644
    rm -f "$tmp"
}

ensure_user() {
    if [ -n "$(uid_of)" ]; then return; fi
    if [ -n "$root" ]; then
        for f in passwd group shadow gshadow; do
            local m=644
            case $f in shadow | gshadow) m=600 ;; esac
            [ -e "$(R /etc/$f)" ] || act "create $(R /etc/$f)" install -D -m $m /dev/null "$(R /etc/$f)"
        done
    fi
    # shellcheck disable=SC2046
    act "create system account $USER_NAME" useradd $(prefix_args) --system --no-create-home \
        --home-dir /var/spool/cvmfs-prepub --shell /usr/sbin/nologin --user-group "$USER_NAME"
}

legacy_paths=(/etc/systemd/system/cvmfs-local-publish.service /usr/local/sbin/cvmfs-local-publish.sh
    /usr/local/bin/cvmfs-spool-submit.sh /etc/cvmfs-local-publish.conf /mnt/build/bits/spool)
legacy() {
    local found=0 p
    for p in "${legacy_paths[@]}"; do [ -e "$(R "$p")" ] && found=1; done
    [ $found -eq 1 ] || return 0
    if [ $purge_legacy -eq 0 ]; then
        say "warning: the legacy bits-console spool daemon (cvmfs-local-publish) is installed; it also runs CVMFS transactions and conflicts with cvmfs-prepub. Remove it with --purge-legacy." >&2
        return 0
    fi
    if have_systemd && systemctl is-enabled cvmfs-local-publish >/dev/null 2>&1; then
        act "stop and disable cvmfs-local-publish" systemctl disable --now cvmfs-local-publish
    fi
    for p in "${legacy_paths[@]}"; do
        [ -e "$(R "$p")" ] && act "remove legacy $(R "$p")" rm -rf "$(R "$p")"
    done
}

do_install() {
    ensure_user
    local u g
    u=$(uid_of)
    g=$(gid_of)
    ensure_file "$here/bin/cvmfs-prepub" "$(R $BIN/cvmfs-prepub)" 755
    ensure_dir "$(R $ETC)" 750 "0" "${g:-0}"
    if want_pub; then
        ensure_file "$here/bin/prepubctl" "$(R $BIN/prepubctl)" 755
        template "$here/config/config.yaml" "$(R $ETC/config.yaml)" 640
        ensure_owner "$(R $ETC/config.yaml)" 0 "$g"
        if [ ! -e "$(R $ETC/env)" ]; then
            local envt
            envt=$(mktemp)
            printf '# Secrets of cvmfs-prepub (mode 0600). Never put these in config.yaml.\nPREPUB_API_TOKEN=\n# CVMFS_GATEWAY_SECRET=\n# AWS_ACCESS_KEY_ID=\n# AWS_SECRET_ACCESS_KEY=\n' >"$envt"
            template "$envt" "$(R $ETC/env)" 600
            rm -f "$envt"
        fi
        ensure_owner "$(R $ETC/env)" "$u" "$g"
        local spool cas
        spool=$(pub_spool)
        cas=$(pub_cas)
        ensure_dir "$(R "$spool")" 750 "$u" "$g"
        ensure_dir "$(R "$cas")" 755 "$u" "$g" new-only
        unit cvmfs-prepub.service "$spool $cas"
    fi
    if want_rcv; then
        template "$here/config/receiver.yaml" "$(R $ETC/receiver.yaml)" 640
        ensure_owner "$(R $ETC/receiver.yaml)" 0 "$g"
        local cas rw s
        cas=$(rcv_cas)
        rw=$cas
        ensure_dir "$(R "$cas")" 755 "$u" "$g" new-only
        while read -r s; do
            [ -n "$s" ] || continue
            case " $rw " in *" $s "*) ;; *) rw="$rw $s" ;; esac
            ensure_dir "$(R "$s")" 755 "$u" "$g" new-only
        done < <(yaml_storages "$(R $ETC/receiver.yaml)")
        unit cvmfs-prepub-receiver.service "$rw"
    fi
    legacy
    if have_systemd && [ $changed -gt 0 ]; then
        act "systemctl daemon-reload" systemctl daemon-reload
        want_pub && act "enable cvmfs-prepub" systemctl enable cvmfs-prepub
        want_rcv && act "enable cvmfs-prepub-receiver" systemctl enable cvmfs-prepub-receiver
    fi
}

remove() { # remove PATH: delete a file or directory tree if present
    [ -e "$(R "$1")" ] || [ -L "$(R "$1")" ] || return 0
    act "remove $(R "$1")" rm -rf "$(R "$1")"
}

do_uninstall() {
    if [ $yes -eq 0 ] && [ $dry -eq 0 ]; then
        if [ -t 0 ]; then
            printf 'Remove cvmfs-prepub (%s)%s%s? [y/N] ' "$mode" \
                "$([ $keep_spool -eq 0 ] && want_pub && echo ', including the spool')" \
                "$([ $keep_cas -eq 0 ] && echo ', including the CAS')"
            read -r answer
            case "$answer" in y | Y | yes) ;; *)
                say "nothing removed"
                exit 1
                ;;
            esac
        else
            say "install.sh: uninstall asks for confirmation; use --yes in automation" >&2
            exit 1
        fi
    fi
    # Paths come from the configuration, which goes last.
    local pcas pspool rcas rstor
    pspool=$(pub_spool)
    pcas=$(pub_cas)
    rcas=$(rcv_cas)
    rstor=$(yaml_storages "$(R $ETC/receiver.yaml)")
    if want_pub; then
        if have_systemd && systemctl list-unit-files cvmfs-prepub.service >/dev/null 2>&1; then
            act "stop and disable cvmfs-prepub" systemctl disable --now cvmfs-prepub
        fi
        remove $UNITS/cvmfs-prepub.service
        remove $BIN/prepubctl
        [ $keep_spool -eq 1 ] || remove "$pspool"
        [ $keep_cas -eq 1 ] || remove "$pcas"
    fi
    if want_rcv; then
        if have_systemd && systemctl list-unit-files cvmfs-prepub-receiver.service >/dev/null 2>&1; then
            act "stop and disable cvmfs-prepub-receiver" systemctl disable --now cvmfs-prepub-receiver
        fi
        remove $UNITS/cvmfs-prepub-receiver.service
        if [ $keep_cas -eq 0 ]; then
            remove "$rcas"
            local s
            for s in $rstor; do remove "$s"; done
        fi
    fi
    # The binary and configuration go when no role is left.
    local other_left=0
    if [ "$mode" = publisher ] && [ -e "$(R $UNITS/cvmfs-prepub-receiver.service)" ]; then other_left=1; fi
    if [ "$mode" = receiver ] && [ -e "$(R $UNITS/cvmfs-prepub.service)" ]; then other_left=1; fi
    if [ $other_left -eq 0 ]; then
        remove $BIN/cvmfs-prepub
        remove $ETC
        if [ $keep_user -eq 0 ] && [ -n "$(uid_of)" ]; then
            # shellcheck disable=SC2046
            act "remove system account $USER_NAME" userdel $(prefix_args) "$USER_NAME"
        fi
    else
        if want_pub; then remove $ETC/config.yaml; remove $ETC/env; fi
        if want_rcv; then remove $ETC/receiver.yaml; remove $ETC/receiver.env; fi
        say "kept $(R $BIN/cvmfs-prepub), $(R $ETC) and the account: the other role is still installed"
    fi
    [ $purge_legacy -eq 1 ] && legacy
    if have_systemd && [ $changed -gt 0 ] && [ $dry -eq 0 ]; then
        systemctl daemon-reload || failed=1
    fi
}

if [ "$action" = install ]; then do_install; else do_uninstall; fi

if [ $changed -eq 0 ]; then
    if [ "$action" = install ]; then
        say "nothing to change: cvmfs-prepub ($mode) is installed and up to date"
    else
        say "nothing to remove: cvmfs-prepub ($mode) is not installed"
    fi
elif [ $dry -eq 1 ]; then
    say "dry run: $changed actions shown, nothing changed"
fi
exit $failed
