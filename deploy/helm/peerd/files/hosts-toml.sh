#!/bin/sh
# peerd hosts-toml mode: points containerd at the node's peerd mirror through
# <certs.d>/<registry>/hosts.toml entries, and takes them away again. POSIX sh (busybox sh).
#
#   hosts-toml.sh install   CERTS_DIR MIRROR_URL NAME=URL...
#       Writes CERTS_DIR/NAME/hosts.toml for each registry: the mirror first, the registry
#       (URL) as containerd's fallback. A file that peerd did not write is first moved to
#       hosts.toml.peerd-backup (never overwritten by a later install). Entries peerd wrote
#       earlier for registries no longer listed are removed (and their backups restored).
#       Idempotent.
#   hosts-toml.sh uninstall CERTS_DIR
#       Removes every hosts.toml peerd wrote under CERTS_DIR and restores its backup; removes
#       directories peerd created when they end up empty. Files peerd did not write are left
#       alone. Idempotent.
#   hosts-toml.sh hold
#       Sleeps until SIGTERM/SIGINT, then exits 0 (the container whose preStop hook uninstalls).
#
# A file is peerd's when it contains the line MARKER below. Every replacement is a rename, so
# containerd (which reads hosts.toml at each pull) sees the old file or the new one, never half.
set -eu

MARKER='# managed-by: peerd'
BACKUP='hosts.toml.peerd-backup'
CREATED='.peerd-created'

log() { echo "peerd hosts-toml: $*" >&2; }
die() { log "error: $*"; exit 1; }

is_ours() { [ -f "$1" ] && grep -qxF "$MARKER" "$1"; }

# remove_entry DIR: DIR/hosts.toml is ours; put back what it replaced, or delete it.
remove_entry() {
  d=$1
  if [ -f "$d/$BACKUP" ]; then
    mv -f "$d/$BACKUP" "$d/hosts.toml"
    log "restored $d/hosts.toml"
  else
    rm -f "$d/hosts.toml"
    log "removed $d/hosts.toml"
  fi
  if [ -f "$d/$CREATED" ]; then
    rm -f "$d/$CREATED"
    rmdir "$d" 2>/dev/null || true
  fi
}

check_name() {
  case $1 in
    '' | . | .. | .* | */* | *[!A-Za-z0-9.:_-]*) die "registry name '$1' is not a host[:port]" ;;
  esac
}

check_url() {
  case $1 in
    http://* | https://*) ;;
    *) die "registry URL '$1' must start with http:// or https://" ;;
  esac
  case $1 in
    *[!A-Za-z0-9.:/_~%@+=-]*) die "registry URL '$1' has characters not allowed here" ;;
  esac
}

install() {
  [ $# -ge 2 ] || die "usage: install CERTS_DIR MIRROR_URL NAME=URL..."
  root=$1 mirror=$2
  shift 2
  check_url "$mirror"
  for e in "$@"; do
    case $e in *=*) ;; *) die "registry '$e' must be NAME=URL" ;; esac
    check_name "${e%%=*}"
    check_url "${e#*=}"
  done
  mkdir -p "$root"

  # Entries of ours for registries no longer listed.
  for f in "$root"/*/hosts.toml; do
    is_ours "$f" || continue
    d=${f%/hosts.toml}
    name=${d##*/}
    listed=no
    for e in "$@"; do
      if [ "${e%%=*}" = "$name" ]; then listed=yes; fi
    done
    if [ $listed = no ]; then remove_entry "$d"; fi
  done

  for e in "$@"; do
    name=${e%%=*} url=${e#*=}
    d=$root/$name
    if [ ! -d "$d" ]; then
      mkdir -p "$d"
      : >"$d/$CREATED"
    fi
    if [ -e "$d/hosts.toml" ] && ! is_ours "$d/hosts.toml"; then
      if [ -e "$d/$BACKUP" ]; then
        # Someone replaced our file since we installed: theirs is the newer one to restore.
        log "replacing the older backup $d/$BACKUP"
      fi
      mv -f "$d/hosts.toml" "$d/$BACKUP"
      log "kept $d/hosts.toml as $d/$BACKUP"
    fi
    tmp=$d/.hosts.toml.peerd-tmp
    cat >"$tmp" <<EOF
$MARKER
# Written by peerd (hosts-toml mode): pulls go to the node's peerd mirror first, then to the
# registry. Removed when the peerd pod leaves this node; a file it replaced is kept as
# $BACKUP and put back then.
server = "$url"

[host."$mirror"]
  capabilities = ["pull", "resolve"]
EOF
    mv -f "$tmp" "$d/hosts.toml"
    log "wrote $d/hosts.toml (mirror $mirror, fallback $url)"
  done
}

uninstall() {
  [ $# -eq 1 ] || die "usage: uninstall CERTS_DIR"
  root=$1
  [ -d "$root" ] || return 0
  for f in "$root"/*/hosts.toml; do
    if is_ours "$f"; then remove_entry "${f%/hosts.toml}"; fi
  done
  # A backup whose hosts.toml is gone (interrupted install): put it back.
  for b in "$root"/*/"$BACKUP"; do
    [ -f "$b" ] || continue
    d=${b%/"$BACKUP"}
    if [ ! -e "$d/hosts.toml" ]; then
      mv -f "$b" "$d/hosts.toml"
      log "restored $d/hosts.toml"
    else
      log "left $b: $d/hosts.toml was replaced by someone else"
    fi
  done
  for m in "$root"/*/"$CREATED"; do
    [ -f "$m" ] || continue
    d=${m%/"$CREATED"}
    if [ -e "$d/hosts.toml" ]; then continue; fi
    rm -f "$m"
    rmdir "$d" 2>/dev/null || true
  done
}

hold() {
  pid=
  trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; exit 0' TERM INT
  while :; do
    sleep 3600 &
    pid=$!
    wait "$pid" || true
  done
}

cmd=${1:-}
if [ $# -gt 0 ]; then shift; fi
case $cmd in
  install) install "$@" ;;
  uninstall) uninstall "$@" ;;
  hold) hold ;;
  *) die "usage: hosts-toml.sh install CERTS_DIR MIRROR_URL NAME=URL... | uninstall CERTS_DIR | hold" ;;
esac
