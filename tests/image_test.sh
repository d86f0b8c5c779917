#!/usr/bin/env bash
# The container image, built for real and run as its own user: CI runs this (.ci/run).
#   bash tests/image_test.sh
#
# Images cannot be pulled here, so the base is made with mmdebstrap (Debian with python3) and
# passed as the Dockerfile's BASE_IMAGE. `podman run` cannot start containers in this sandbox
# (setting rlimits is refused), so the image's entrypoint runs in `podman image mount` under
# `chroot --userspec` with the image's own user and environment, and its HEALTHCHECK command
# must answer 0. Skipped, with a message, only where podman or mmdebstrap cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "image test: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v podman >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
    say "installing Debian's podman and mmdebstrap"
    if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq podman mmdebstrap >/dev/null; }; then
        say "SKIPPED: podman or mmdebstrap cannot be installed on this machine"
        exit 0
    fi
fi
[ "$(id -u)" = 0 ] || exec sudo --preserve-env=PATH bash "$0" "$@"

# -- the base image: cached by its inputs, outside the repository ------------------------------
CACHE=${SIDECAR_CI_CACHE:-/var/cache/sidecar-ci}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
key=$(printf '%s\n' "$SUITE" "$PACKAGES" minbase "$(mmdebstrap --version)" \
    "$(dpkg --print-architecture)" | sha256sum | cut -c1-16)
base_tar=$CACHE/base-$key.tar
base_image=localhost/sidecar-ci-base:$key
mkdir -p "$CACHE"
if [ ! -s "$base_tar" ]; then
    say "making the base with mmdebstrap ($SUITE + $PACKAGES)"
    rm -rf "$CACHE"/base-*.tar  # older inputs: never used again
    # The name must end in .tar: mmdebstrap picks the output format from it.
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
        --aptopt='APT::Install-Recommends "false"' "$SUITE" "$CACHE/partial-$key.tar"
    mv "$CACHE/partial-$key.tar" "$base_tar"
fi
podman image exists "$base_image" || podman import --quiet "$base_tar" "$base_image" >/dev/null

# -- the build -----------------------------------------------------------------------------------
image=localhost/sidecar:ci-test
say "podman build --isolation chroot (BASE_IMAGE=$base_image)"
# --format docker: the OCI format has no HEALTHCHECK and would drop it.
# The CA bundle this machine trusts goes in as a build secret: pip inside the build reaches the
# package index through the same TLS-inspecting proxy, if there is one.
secret=()
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ ! -s "$ca" ] || secret=(--secret "id=pip_cert,src=$ca")
podman build --quiet --isolation chroot --format docker --build-arg BASE_IMAGE="$base_image" \
    "${secret[@]}" --tag "$image" . >/dev/null

inspect() { podman image inspect --format "$1" "$image"; }
user=$(inspect '{{.Config.User}}')
[ "$user" = 10001:10001 ] || fail "the image runs as '$user', not 10001:10001"
[ "$(inspect '{{.Config.StopSignal}}')" = SIGTERM ] || fail "STOPSIGNAL is not SIGTERM"
volumes=$(inspect '{{json .Config.Volumes}}')
for v in /run/sidecar /var/lib/sidecar; do
    [[ $volumes == *"\"$v\""* ]] || fail "$v is not a volume: $volumes"
done
mapfile -t entrypoint < <(inspect '{{range .Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t env_list < <(inspect '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t health < <(inspect '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' | sed '/^$/d')
[ "${health[0]:-}" = CMD ] || fail "HEALTHCHECK is missing or not in exec form: ${health[*]:-none}"
health=("${health[@]:1}")
size=$(inspect '{{.Size}}')

# -- run the entrypoint as the image's user ------------------------------------------------------
work=$(mktemp -d /tmp/sidecar-image.XXXXXX)
mnt=$(podman image mount "$image")
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then kill -KILL "$daemon_pid"; fi
    umount "$mnt/run/sidecar" "$mnt/var/lib/sidecar" "$mnt/dev/null" 2>/dev/null || true
    podman image unmount "$image" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
[ ! -e "$mnt/opt/sidecar/bin/pip" ] || fail "pip is in the runtime venv"
[ ! -e "$mnt/src" ] || fail "the build stage's sources are in the runtime image"

# What a container runtime provides: the two volumes (owned by the image's user) and /dev/null.
for v in run/sidecar var/lib/sidecar; do
    mkdir -p "$work/$v"
    chown 10001:10001 "$work/$v"
    chmod 0750 "$work/$v"
    mount --bind "$work/$v" "$mnt/$v"
done
mount --bind /dev/null "$mnt/dev/null"

in_image() {  # in_image UID:GID command...: run in the image, with only the image's environment
    local spec=$1
    shift
    env -i "${env_list[@]}" chroot --userspec="$spec" --groups="${spec#*:}" "$mnt" "$@"
}

say "running the entrypoint (${entrypoint[*]}) as $user"
# As in a container: the daemon is PID 1 of its own PID namespace (the kernel delivers PID 1
# only the signals it handles), run straight from the entrypoint, with no shell in between.
# `timeout` bounds the whole run: a daemon that ignored SIGTERM would fail, not hang, the test.
timeout --signal=KILL 120 unshare --pid --fork --kill-child \
    env -i "${env_list[@]}" chroot --userspec="$user" --groups="${user#*:}" "$mnt" \
    "${entrypoint[@]}" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 1 300); do  # at most 30 s for the daemon to log that it serves
    grep -q '"event": "serving"' "$work/daemon.log" && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.log" >&2; fail "the daemon exited"; }
    sleep 0.1
done
grep -q '"event": "serving"' "$work/daemon.log" || { cat "$work/daemon.log" >&2; fail "not serving"; }

in_image "$user" "${health[@]}" || fail "the HEALTHCHECK command (${health[*]}) did not answer 0"
# A service container in group 10001 reaches the socket; another user does not.
in_image 10002:10001 sidecar health >/dev/null || fail "a member of group 10001 cannot connect"
if in_image 10003:10003 sidecar health >/dev/null 2>&1; then
    fail "a user outside group 10001 could connect"
fi

pid1=$(pgrep -P "$(pgrep -P "$daemon_pid")")  # timeout -> unshare -> the daemon
grep -q "^NSpid:.*[[:space:]]1$" "/proc/$pid1/status" || fail "the daemon is not PID 1 in its namespace"
kill -TERM "$pid1"
code=0
wait "$daemon_pid" || code=$?
daemon_pid=
[ "$code" = 0 ] || { cat "$work/daemon.log" >&2; fail "SIGTERM: the daemon exited $code"; }
grep -q '"event": "stopped"' "$work/daemon.log" || fail "no 'stopped' line after SIGTERM"
[ ! -e "$work/run/sidecar/sidecar.sock" ] || fail "the socket file is left after a clean stop"

# Superseded images and build stages pile up run after run: drop those older than a week.
podman image prune --force --filter until=168h >/dev/null 2>&1 || true

say "ok: image $image, $((size / 1000000)) MB, user $user, health answered 0, PID 1 exits 0 on SIGTERM"
echo "image test: 1 passed, 0 failed"
