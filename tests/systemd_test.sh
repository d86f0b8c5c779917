#!/usr/bin/env bash
# The units under a real systemd: systemd/README.md's install steps in a Debian root booted
# with systemd-nspawn, then Type=notify, socket activation across `systemctl restart`, the
# socket's group, the watchdog and a clean stop, all as systemd itself sees them. CI runs this
# (.ci/run) after tests/image_test.sh, whose image provides the daemon's virtualenv.
#   bash tests/systemd_test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

say() { echo "systemd test: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
skip() { say "SKIPPED: $*"; exit 0; }

[ "$(id -u)" = 0 ] || skip "needs root to boot a container"
if ! command -v systemd-nspawn >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
    say "installing Debian's systemd-container and mmdebstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq systemd-container mmdebstrap >/dev/null; } \
        || skip "systemd-nspawn or mmdebstrap cannot be installed on this machine"
fi
image=localhost/sidecar:ci-test
if ! podman image exists "$image" 2>/dev/null; then
    bash tests/image_test.sh >&2
    podman image exists "$image" || skip "the image (tests/image_test.sh) could not be built"
fi

# -- the root: Debian with systemd, cached by its inputs --------------------------------------
CACHE=${SIDECAR_CI_CACHE:-/var/cache/sidecar-ci}
SUITE=bookworm
PACKAGES=systemd,python3,procps,passwd,redis-server
key=$(printf '%s\n' "$SUITE" "$PACKAGES" minbase "$(mmdebstrap --version)" \
    "$(dpkg --print-architecture)" | sha256sum | cut -c1-16)
root_tar=$CACHE/systemd-root-$key.tar
mkdir -p "$CACHE"
if [ ! -s "$root_tar" ]; then
    say "making a Debian root with systemd ($PACKAGES)"
    rm -rf "$CACHE"/systemd-root-*.tar
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
        --aptopt='APT::Install-Recommends "false"' "$SUITE" "$CACHE/partial-systemd-$key.tar"
    mv "$CACHE/partial-systemd-$key.tar" "$root_tar"
fi

work=$(mktemp -d /tmp/sidecar-sd.XXXXXX)
root=$work/root
nspawn_pid=
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid"  # nspawn asks the container's systemd to power off
        for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$root"
tar -C "$root" -xf "$root_tar"

# The daemon: the image's virtualenv (built for this Debian's python3) at the unit's ExecStart.
mnt=$(podman image mount "$image")
cp -a "$mnt/opt/sidecar" "$root/opt/"
podman image unmount "$image" >/dev/null

# systemd/README.md's install steps, inside the root.
mkdir -p "$root/etc/sysusers.d"
install -m 0644 systemd/sidecar.sysusers "$root/etc/sysusers.d/sidecar.conf"
systemd-sysusers --root="$root" >/dev/null 2>&1
chroot "$root" install -d -m 0750 /etc/sidecar
chroot "$root" install -m 0640 -g sidecar /dev/null /etc/sidecar/sidecar.env
chroot "$root" install -m 0600 /dev/null /etc/sidecar/redis-password
install -m 0644 systemd/sidecar.service systemd/sidecar.socket "$root/etc/systemd/system/"
systemctl --root="$root" enable sidecar.socket sidecar.service >/dev/null 2>&1
# A service user in the group, and one outside it.
chroot "$root" useradd --no-create-home --groups sidecar app
chroot "$root" useradd --no-create-home stranger
# For the watchdog check only: a 2 s WatchdogSec= and the SIGUSR2 hook that blocks the loop.
mkdir -p "$root/etc/systemd/system/sidecar.service.d"
cat >"$root/etc/systemd/system/sidecar.service.d/ci.conf" <<'CONF'
[Service]
WatchdogSec=2
Environment=SIDECAR_DEBUG_HOOKS=1 SIDECAR_DEBUG_BLOCK_SECONDS=6
CONF
install -m 0644 "$repo/tests/restart_check.py" "$root/root/restart_check.py"

say "booting it with systemd-nspawn"
systemd-nspawn --directory="$root" --register=no --keep-unit --boot --quiet --console=pipe \
    >"$work/boot.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: a descendant of nspawn that is PID 1 in its own PID namespace and
# runs systemd (nspawn's intermediate processes come and go first).
container_init() {
    local pid
    for pid in $(ps -e -o pid= --forest); do
        [ "$pid" != "$nspawn_pid" ] || continue
        grep -qs "^NSpid:.*[[:space:]]1$" "/proc/$pid/status" || continue
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ] || continue
        pstree_has_parent "$pid" && { echo "$pid"; return; }
    done
}
pstree_has_parent() {  # is $1 a descendant of nspawn?
    local p=$1
    while [ -n "$p" ] && [ "$p" -gt 1 ]; do
        [ "$p" = "$nspawn_pid" ] && return 0
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)
    done
    return 1
}
init=
for _ in $(seq 1 300); do  # at most 30 s
    init=$(container_init)
    [ -n "$init" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$init" ] || { cat "$work/boot.log" >&2; skip "systemd-nspawn could not boot a container"; }
ct() { nsenter --target "$init" --all "$@"; }
for _ in $(seq 1 600); do  # at most 60 s until the container's systemd answers systemctl
    ct test -S /run/systemd/private 2>/dev/null && break
    sleep 0.1
done
state=$(timeout 120 nsenter --target "$init" --all systemctl is-system-running --wait || true)
case "$state" in
    running | degraded) ;;
    *) cat "$work/boot.log" >&2; fail "the container's systemd did not come up ($state)" ;;
esac
show() { ct systemctl show --property="$1" --value sidecar.service; }

# Type=notify: active only after READY=1, with the daemon's STATUS= line.
[ "$(ct systemctl is-active sidecar.socket sidecar.service | sort -u)" = active ] \
    || { ct systemctl status --no-pager sidecar.service >&2 || true; fail "the units are not active"; }
status=$(show StatusText)
[[ $status == "ok: mode=local_only queued=0 processing=0" ]] || fail "StatusText is '$status'"
ct journalctl --unit=sidecar --no-pager | grep -q '"socket_activated": true' \
    || fail "the daemon did not serve the socket unit's socket"
say "active (Type=notify), status '$status', socket-activated"

# The socket: 0660 sidecar:sidecar; a member of the group connects, another user cannot.
perms=$(ct stat -c '%a %U:%G' /run/sidecar/sidecar.sock)
[ "$perms" = "660 sidecar:sidecar" ] || fail "the socket is $perms"
health=(env SIDECAR_SOCKET=/run/sidecar/sidecar.sock /opt/sidecar/bin/sidecar health)
ct runuser -u app -- "${health[@]}" >/dev/null || fail "a member of group sidecar cannot connect"
if ct runuser -u stranger -- "${health[@]}" >/dev/null 2>&1; then
    fail "a user outside group sidecar could connect"
fi
say "socket $perms: group member answered, stranger refused"

# systemctl restart with clients connecting all along: none refused.
restarts=$(show NRestarts)
counts=$(ct /opt/sidecar/bin/python /root/restart_check.py) || fail "restart: $counts"
say "systemctl restart: $counts"

# The watchdog: a loop blocked for 6 s misses the 2 s WatchdogSec; systemd restarts the daemon.
pid=$(show MainPID)
ct systemctl kill --kill-who=main --signal=SIGUSR2 sidecar.service
for _ in $(seq 1 300); do
    [ "$(show NRestarts)" -gt "$restarts" ] && [ "$(show ActiveState)" = active ] && break
    sleep 0.1
done
[ "$(show NRestarts)" -gt "$restarts" ] || fail "the blocked daemon was not restarted"
[ "$(show MainPID)" != "$pid" ] || fail "the same process still runs"
# journald may write the line a moment after the restart: look again for up to 10 s.
logged=0
for _ in $(seq 1 100); do
    if ct journalctl --unit=sidecar --no-pager | grep -q "Watchdog timeout"; then
        logged=1
        break
    fi
    sleep 0.1
done
[ "$logged" = 1 ] || fail "systemd did not log a watchdog timeout"
say "watchdog: the blocked daemon (pid $pid) was killed and restarted"

# A clean stop: SIGTERM drains, the daemon exits 0, the socket stays with sidecar.socket.
ct systemctl stop sidecar.service 2>/dev/null  # it warns that the socket can start it again
[ "$(show Result)" = success ] || fail "stop: Result=$(show Result)"
ct test -S /run/sidecar/sidecar.sock || fail "the socket went away with the service"
ct runuser -u app -- "${health[@]}" >/dev/null || fail "the socket did not start the daemon again"
say "stop: Result=success; the next connection started the daemon again"

# Redis with a password: the password reaches the daemon only as a credential file.
secret=ci-$RANDOM-$RANDOM
# A plain transient unit: Debian's redis-server.service does not start in this container.
ct systemctl stop redis-server.service 2>/dev/null || true
ct systemd-run --quiet --unit=ci-redis --property=User=redis /usr/bin/redis-server --port 6379 \
    --bind 127.0.0.1 --save '' --maxmemory-policy noeviction --requirepass "$secret"
for _ in $(seq 1 100); do  # at most 10 s until it answers
    ct redis-cli -a "$secret" --no-auth-warning ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done
ct sh -c "echo REDIS_URL=redis://127.0.0.1:6379/0 >/etc/sidecar/sidecar.env"
ct sh -c "printf '%s' '$secret' >/etc/sidecar/redis-password"
ct systemctl restart sidecar.service
status=$(show StatusText)
[[ $status == "ok: mode=redis "* ]] || fail "with Redis and its password, StatusText is '$status'"
pid=$(show MainPID)
if ct grep -qa "$secret" "/proc/$pid/environ" "/proc/$pid/cmdline"; then
    fail "the password is in the daemon's environment or command line"
fi
ct grep -qa "REDIS_PASSWORD_FILE=/run/credentials/sidecar.service/redis-password" \
    "/proc/$pid/environ" || fail "REDIS_PASSWORD_FILE does not point at the credential"
say "Redis: status '$status'; the password came as a credential, not in environ or argv"

echo "systemd test: 1 passed, 0 failed"
