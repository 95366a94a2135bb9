#!/usr/bin/env bash
# scripts/guest/build.sh - builds, and caches, the qemu guest that pyovpn's kernel tests run in.
#
# Owns everything under the cache directory ${PYOVPN_GUEST_CACHE:-/var/cache/pyovpn-guest}:
#   current -> img-<stamp>/   the image scripts/guest/run.sh boots:
#       vmlinuz, initrd.cpio   linux 7.3.x from trixie-backports + a busybox initramfs
#       rootfs.img             ext4, Debian trixie minbase (qemu opens it copy-on-write, never modifies it)
#       stamp, manifest.txt    what built it, and the versions inside
#   downloads/                 .deb caches kept between builds, so a rebuild downloads nothing twice
# and the host packages the harness needs (qemu-system-x86, debootstrap, ...; apt-get installs missing ones).
#
# The guest holds: linux 7.3.x with its modules (ovpn.ko) and openvpn 2.7.x, both from trixie-backports;
# python3 with pyovpn's dependencies as pyproject.toml states them (cryptography, pyOpenSSL, pyroute2)
# plus pytest and hypothesis: Debian's packages where new enough, otherwise wheels fetched by the host's
# pip and installed by the guest's pip; iproute2, iperf3, ping, procps, kmod, openssl. PID 1 is the init
# written below, which runs the command that scripts/guest/run.sh hands it.
#
# Idempotent: when current/stamp matches the sha256 of this script, of those requirements and of the
# PYOVPN_GUEST_KERNEL / PYOVPN_GUEST_EXTRA_PKGS overrides, nothing is rebuilt. The Debian archive is
# the one this host's own apt uses; the host's apt sources are never changed (trixie is configured
# only inside the chroot).
#
# Usage:  scripts/guest/build.sh [--force]        (as root; --print-stamp prints the stamp and exits)
# Environment:
#   PYOVPN_GUEST_CACHE       cache directory (default /var/cache/pyovpn-guest)
#   PYOVPN_GUEST_MIRROR      Debian archive URL (default: the host apt's Debian archive)
#   PYOVPN_GUEST_KERNEL      kernel ABI to install, e.g. 7.3.4+deb13-amd64 (default: newest 7.3.x)
#   PYOVPN_GUEST_EXTRA_PKGS  more Debian packages for the guest (space separated)
# Exit status: 0 image ready; 1 build failed; 64 usage; 69 cannot build here (not root, or the host
# prerequisites cannot be installed).
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
CHECKOUT=$(cd "$(dirname "$SCRIPT")/../.." && pwd -P)
readonly SCRIPT CHECKOUT
readonly CACHE=${PYOVPN_GUEST_CACHE:-/var/cache/pyovpn-guest}
readonly SUITE=trixie
readonly KERNEL_SERIES=7.3
readonly OPENVPN_SERIES=2.7

# Guest Debian packages (from trixie; openvpn and the kernel come from trixie-backports below).
GUEST_PKGS=(python3 python3-packaging iproute2 iperf3 iputils-ping procps kmod mount openssl busybox-static)
read -r -a EXTRA_PKGS <<<"${PYOVPN_GUEST_EXTRA_PKGS:-}"
GUEST_PKGS+=("${EXTRA_PKGS[@]+"${EXTRA_PKGS[@]}"}")
# Python packages the guest needs: pyovpn's [project] dependencies and these test tools, with the
# minimum versions pyproject.toml gives them (its [test] extra for the tools).
GUEST_TEST_TOOLS="pytest hypothesis"
# Debian's name for a Python distribution, where it is not python3-<name in lower case>.
deb_name_of() {
    case ${1,,} in
        pyopenssl) echo python3-openssl ;;
        *) echo "python3-${1,,}" ;;
    esac
}
python_requirements() {  # one line per distribution: "<name> <minimum or 0> <requirement for pip>"
    python3 - "$CHECKOUT/pyproject.toml" "$GUEST_TEST_TOOLS" <<'EOF'
import re, sys, tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
tools = sys.argv[2].split()
name_of = lambda req: re.match(r"[A-Za-z0-9._-]+", req).group(0)
reqs = list(project.get("dependencies", []))
extra = {name_of(r).lower(): r for r in project.get("optional-dependencies", {}).get("test", [])}
reqs += [extra.get(tool, tool) for tool in tools]
for req in reqs:
    req = req.split(";")[0].replace(" ", "")
    minimum = re.search(r">=([0-9][^,]*)", req)
    print(name_of(req), minimum.group(1) if minimum else "0", req)
EOF
}
# Host packages: command (or file) it provides -> package.
HOST_PREREQS=(
    "qemu-system-x86_64 qemu-system-x86"
    "debootstrap debootstrap"
    "mke2fs e2fsprogs"
    "cpio cpio"
    "xz xz-utils"
    "zstd zstd"
    "flock util-linux"
)

T0=$(date +%s.%N)
STAGE_T=$T0
STAGE_NAME=""
log() { echo "build.sh: $*"; }
die() { echo "build.sh: error: $*" >&2; exit 1; }
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
stage() {  # prints how long the previous stage took, then starts the next one
    if [ -n "$STAGE_NAME" ]; then log "   ... $STAGE_NAME took $(secs_since "$STAGE_T") s"; fi
    STAGE_NAME=$1
    STAGE_T=$(date +%s.%N)
    log "== $(date +%T) $1"
}
mib() { du -sm --apparent-size "$@" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }

# What the image depends on: this script, pyovpn's Python requirements, and the overrides.
PY_REQS=$(python_requirements) || die "cannot read the Python requirements from $CHECKOUT/pyproject.toml"
STAMP=$( { sha256sum <"$SCRIPT"; echo "$PY_REQS"
           echo "kernel=${PYOVPN_GUEST_KERNEL:-} extra=${PYOVPN_GUEST_EXTRA_PKGS:-}"; } | sha256sum | cut -c1-16)

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    --print-stamp) echo "$STAMP"; exit 0 ;;   # used by run.sh to tell a stale image
    -h|--help) sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--force]" >&2; exit 64 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "build.sh: must run as root (debootstrap, chroot, apt-get)" >&2
    exit 69
fi

# --- 1. host prerequisites -----------------------------------------------------------------------------
apt_install_on_host() {
    local missing=("$@")
    log "installing host packages: ${missing[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "build.sh: no apt-get to install ${missing[*]}" >&2
        exit 69
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        echo "build.sh: could not install the host packages ${missing[*]}" >&2
        exit 69
    fi
}
install_host_prereqs() {
    local missing=() entry cmd pkg
    for entry in "${HOST_PREREQS[@]}"; do
        read -r cmd pkg <<<"$entry"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] || apt_install_on_host "${missing[@]}"
}
install_host_prereqs

# --- 2. up to date already? ----------------------------------------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
    log "another build is running; waiting for it"
    flock 9
fi

image_ready() {
    local d=$CACHE/current
    [ -f "$d/stamp" ] && [ "$(cat "$d/stamp")" = "$STAMP" ] &&
        [ -s "$d/vmlinuz" ] && [ -s "$d/initrd.cpio" ] && [ -s "$d/rootfs.img" ]
}
if [ "$FORCE" = 0 ] && image_ready; then
    IMG=$(readlink -f "$CACHE/current")
    log "guest image is up to date (stamp $STAMP): $IMG"
    sed 's/^/build.sh:   /' "$IMG/manifest.txt"
    log "done in $(secs_since "$T0") s (cached)"
    exit 0
fi

# --- 3. the Debian archive, as this host's apt knows it ------------------------------------------------
host_debian_mirror() {
    # apt itself parses sources.list and *.sources; keep the URI that serves the host's own release.
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || return 0
    # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
        awk -v cn="$codename" '$2 == cn { print $1; exit }'
}
MIRROR=${PYOVPN_GUEST_MIRROR:-$(host_debian_mirror)}
MIRROR=${MIRROR%/}
[ -n "$MIRROR" ] || die "cannot find a Debian archive in this host's apt sources; set PYOVPN_GUEST_MIRROR"
log "building guest image $STAMP in $CACHE from $MIRROR ($SUITE + $SUITE-backports)"
# The host's pip fetches wheels for the guest (with the host's pip configuration).
python3 -m pip --version >/dev/null 2>&1 || apt_install_on_host python3-pip

# --- 4. workspace and clean-up -------------------------------------------------------------------------
DL=$CACHE/downloads
WORK=$CACHE/build
ROOT=$WORK/rootfs
mkdir -p "$DL/debootstrap" "$DL/apt/partial"
DL_MIB_BEFORE=$(mib "$DL")

unmount_chroot() {
    local m
    for m in var/cache/apt/archives proc; do
        if mountpoint -q "$ROOT/$m" 2>/dev/null; then umount "$ROOT/$m" || umount -l "$ROOT/$m"; fi
    done
}
cleanup() {
    local rc=$?
    unmount_chroot
    [ "$rc" -eq 0 ] || log "FAILED (exit $rc); the partial build is left in $WORK"
}
trap cleanup EXIT
unmount_chroot   # left over from an interrupted build
# --one-file-system: never follow a mount that is still inside the old tree into the download cache
rm -rf --one-file-system "$WORK"
mkdir -p "$WORK"

in_chroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
                  DEBIAN_FRONTEND=noninteractive "$@"; }

# --- 5. trixie minbase ---------------------------------------------------------------------------------
stage "debootstrap $SUITE (minbase)"
debootstrap --variant=minbase --cache-dir="$DL/debootstrap" "$SUITE" "$ROOT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

# --- 6. apt inside the chroot: trixie + trixie-backports -----------------------------------------------
stage "apt-get update in the guest rootfs"
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# no daemons may start inside the chroot (openvpn and iperf3 ship services)
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
mount --bind "$DL/apt" "$ROOT/var/cache/apt/archives"
in_chroot apt-get update -qq

# kernel ABI: linux-image-<abi> is only a meta package (it would pull an initramfs generator); the
# kernel is linux-binary-<abi> and its modules linux-modules-<abi>.
newest_kernel() {
    in_chroot apt-cache search --names-only "^linux-binary-${KERNEL_SERIES//./\\.}\\.[0-9]+\\+deb13-amd64\$" |
        awk '{ sub(/^linux-binary-/, "", $1); print $1 }' | sort -V | tail -n 1
}
KABI=${PYOVPN_GUEST_KERNEL:-$(newest_kernel)}
[ -n "$KABI" ] || die "no linux ${KERNEL_SERIES}.x kernel found in $SUITE-backports"
log "kernel: linux-binary-$KABI"

# Python requirements: Debian's package if new enough, else a wheel.
PIP_SPECS=()
while read -r dist min spec; do
    deb=$(deb_name_of "$dist")
    cand=$(in_chroot apt-cache policy "$deb" | awk '$1 == "Candidate:" { print $2 }')
    if [ -n "$cand" ] && [ "$cand" != "(none)" ] && dpkg --compare-versions "$cand" ge "$min"; then
        GUEST_PKGS+=("$deb")
        log "python: $dist from Debian ($deb $cand; pyproject.toml: $spec)"
    else
        PIP_SPECS+=("$spec")
        log "python: $dist from a wheel (Debian has ${cand:-nothing}; pyproject.toml: $spec)"
    fi
done <<<"$PY_REQS"
[ "${#PIP_SPECS[@]}" -eq 0 ] || GUEST_PKGS+=(python3-pip)

stage "apt-get install: ${#GUEST_PKGS[@]} packages + openvpn and linux $KABI from $SUITE-backports"
in_chroot apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
    "${GUEST_PKGS[@]}" "openvpn/$SUITE-backports" "linux-binary-$KABI" "linux-modules-$KABI" \
    >"$WORK/apt-install.log" 2>&1 || { tail -n 30 "$WORK/apt-install.log" >&2; die "apt-get install failed"; }
OPENVPN_VERSION=$(in_chroot openvpn --version | head -n 1) || true
[[ "$OPENVPN_VERSION" == "OpenVPN $OPENVPN_SERIES."* ]] ||
    die "expected openvpn $OPENVPN_SERIES.x from $SUITE-backports, got: $OPENVPN_VERSION"

# --- 7. wheels for what Debian has too old -------------------------------------------------------------
pip_install() {
    # The host's pip (and its configuration: index, proxy, certificates) downloads wheels for the
    # guest's interpreter and platform; the guest's pip installs them without network access, into
    # /usr/local, where they take precedence over Debian's packages (which pip must not uninstall).
    local platforms=() p
    for p in $(in_chroot python3 -c 'from packaging import tags; print(*tags.platform_tags())'); do
        platforms+=(--platform "$p")
    done
    rm -rf "$WORK/wheels" "$ROOT/tmp/wheels"
    python3 -m pip download --disable-pip-version-check --dest "$WORK/wheels" --only-binary=:all: \
        --implementation cp --python-version "$GUEST_PYVER" "${platforms[@]}" "${PIP_SPECS[@]}" \
        >>"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log" >&2; die "pip download failed"; }
    cp -r "$WORK/wheels" "$ROOT/tmp/wheels"
    in_chroot python3 -m pip install --disable-pip-version-check --no-cache-dir --root-user-action=ignore \
        --no-warn-script-location --break-system-packages --no-index --find-links /tmp/wheels --ignore-installed \
        "${PIP_SPECS[@]}" >>"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log" >&2; die "pip install failed"; }
    rm -rf "$ROOT/tmp/wheels"
}
if [ "${#PIP_SPECS[@]}" -gt 0 ]; then
    stage "pip: ${PIP_SPECS[*]}"
    GUEST_PYVER=$(in_chroot python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
    for round in 1 2 3; do
        pip_install
        # A wheel may be too new for a Debian package that depends on it (say pyOpenSSL on
        # cryptography); such packages then come from wheels as well.
        if broken=$(in_chroot python3 -m pip check 2>&1); then break; fi
        [ "$round" -lt 3 ] || die "pip check still fails: $broken"
        more=$(awk '/ has requirement / { print $1 }' <<<"$broken" | sort -u)
        [ -n "$more" ] || die "pip check: $broken"
        log "wheels break what these need, so they come from wheels too: $(tr "\n" " " <<<"$more")"
        for dist in $more; do PIP_SPECS+=("$dist"); done
    done
    log "installed: $(cd "$WORK/wheels" && echo *.whl)"
fi

stage "checking the guest userspace"
in_chroot python3 - "$PY_REQS" <<'EOF'
import importlib, importlib.metadata as md, sys
from packaging.version import Version
bad = []
for line in sys.argv[1].splitlines():
    dist, minimum, _spec = line.split()
    have = md.version(dist)
    if Version(have) < Version(minimum):
        bad.append(f"{dist} {have} < {minimum}")
for mod in ("cryptography", "OpenSSL", "pyroute2", "pytest", "hypothesis"):
    importlib.import_module(mod)
from OpenSSL import SSL
if not hasattr(SSL.Connection, "export_keying_material"):
    bad.append("pyOpenSSL has no Connection.export_keying_material")
if sys.version_info < (3, 11):
    bad.append(f"python {sys.version.split()[0]} < 3.11")
if bad:
    sys.exit("guest python requirements not met: " + "; ".join(bad))
EOF
in_chroot depmod -a "$KABI"
in_chroot modinfo -k "$KABI" -F filename ovpn >/dev/null || die "linux $KABI has no ovpn module"

# --- 8. guest configuration and its PID 1 --------------------------------------------------------------
stage "guest configuration"
rm -f "$ROOT/usr/sbin/policy-rc.d"
: >"$ROOT/etc/resolv.conf"          # the guest has no network interfaces besides lo
echo pyovpn-guest >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost pyovpn-guest\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
cat >"$ROOT/etc/fstab" <<'EOF'
# mounted by the guest's init (pyovpn-guest-init) with one `mount -a`
proc      /proc              proc      defaults                                   0 0
sysfs     /sys               sysfs     defaults                                   0 0
devtmpfs  /dev               devtmpfs  defaults                                   0 0
devpts    /dev/pts           devpts    gid=5,mode=620,ptmxmode=666,X-mount.mkdir  0 0
tmpfs     /dev/shm           tmpfs     mode=1777,X-mount.mkdir                    0 0
tmpfs     /run               tmpfs     mode=755                                   0 0
tmpfs     /tmp               tmpfs     mode=1777                                  0 0
debugfs   /sys/kernel/debug  debugfs   nofail                                     0 0
EOF

cat >"$ROOT/usr/local/sbin/pyovpn-guest-init" <<'GUEST_INIT'
#!/bin/bash
# PID 1 of the pyovpn test guest. Written by scripts/guest/build.sh, driven by scripts/guest/run.sh.
# Mounts the kernel filesystems and run.sh's two 9p shares:
#   pyovpnctl -> /run/pyovpn   settings, command, env (from run.sh); started, exit-code, timed-out (to it)
#   pyovpnsrc -> the checkout, at the same absolute path as on the host
# loads ovpn, runs the command as root in the checkout, records its exit status, and powers off.
# No `set -e`: PID 1 must always reach the power-off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb NO_COLOR=1
CTL=/run/pyovpn
say() { echo "pyovpn-guest: $*"; }
power_off() {
    cd /
    sync
    echo o >/proc/sysrq-trigger
    read -r -t 30 _   # a builtin: once the power-off has begun, nothing can be run from the disk
    exit 1            # if power-off failed: PID 1 exits, the kernel panics, qemu (-no-reboot) stops
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

exec </dev/console >/dev/console 2>&1   # the rootfs's own /dev/console, before devtmpfs covers /dev
mount -a                                  # /etc/fstab: proc, sysfs, devtmpfs, devpts, tmpfs, debugfs
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
echo pyovpn-guest >/proc/sys/kernel/hostname
ip link set lo up

# One modprobe, as every process start is slow under TCG. tun: there is no udev to create the
# /dev/net/tun node that would load it on first use.
modprobe -a 9pnet_virtio 9p ovpn tun
mkdir -p "$CTL"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,cache=none pyovpnctl "$CTL"; then
    say "cannot mount run.sh's control share"
    power_off
fi
: >"$CTL/started"
PYOVPN_CHECKOUT=/ PYOVPN_TIMEOUT=600
# shellcheck source=/dev/null
. "$CTL/settings"
mkdir -p "$PYOVPN_CHECKOUT"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose pyovpnsrc "$PYOVPN_CHECKOUT"; then
    say "cannot mount the checkout at $PYOVPN_CHECKOUT"
    power_off
fi

if [ -d /sys/module/ovpn ] || modprobe ovpn; then say "modprobe ovpn: ok"; else say "modprobe ovpn: FAILED"; fi
cd "$PYOVPN_CHECKOUT" || power_off
export PYOVPN_GUEST=1 PYOVPN_CHECKOUT PYTHONPATH="$PYOVPN_CHECKOUT/src"
# shellcheck source=/dev/null
[ -f "$CTL/env" ] && . "$CTL/env"
t0=$(uptime_s)
: >"$CTL/command-started"
say "linux $(uname -r), up ${t0}s; running in $PWD: $(cat "$CTL/command")"
timeout --kill-after=10 "$PYOVPN_TIMEOUT" bash "$CTL/command" </dev/null
rc=$?
elapsed=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
# timeout(1) exits 124 (or 137 after its KILL); the command itself might too, so check the clock
if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } &&
    awk -v e="$elapsed" -v t="$PYOVPN_TIMEOUT" 'BEGIN { exit !(e >= t) }'; then
    echo "$PYOVPN_TIMEOUT" >"$CTL/timed-out"
    say "TIMEOUT: the command was stopped after ${elapsed}s (limit ${PYOVPN_TIMEOUT}s)"
else
    echo "$rc" >"$CTL/exit-code"
    say "command exited with code $rc after ${elapsed}s"
fi
if dmesg | grep -qE 'WARNING:|BUG:|Oops|Call Trace:|general protection'; then
    say "the kernel logged a warning or an oops; last kernel messages:"
    dmesg | tail -n 80
fi
sync
umount "$PYOVPN_CHECKOUT" 2>/dev/null
power_off
GUEST_INIT
chmod 755 "$ROOT/usr/local/sbin/pyovpn-guest-init"

# --- 9. initramfs: busybox + the modules needed to mount /dev/vda --------------------------------------
stage "initramfs"
INITRAMFS=$WORK/initramfs
mkdir -p "$INITRAMFS"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOT/usr/bin/busybox" "$INITRAMFS/bin/busybox"
mknod -m 600 "$INITRAMFS/dev/console" c 5 1
: >"$INITRAMFS/modules.order"
for mod in virtio_blk ext4; do
    # "insmod <path>" lines, dependencies first; "builtin <name>" lines need nothing
    while read -r kind path; do
        [ "$kind" = insmod ] || continue
        name=$(basename "$path"); name=${name%%.ko*}
        grep -qx "$name" "$INITRAMFS/modules.order" && continue
        case "$path" in
            *.ko.xz)  xz -dc "$ROOT$path" ;;
            *.ko.zst) zstd -qdc "$ROOT$path" ;;
            *.ko.gz)  gzip -dc "$ROOT$path" ;;
            *.ko)     cat "$ROOT$path" ;;
            *) die "unexpected module file $path" ;;
        esac >"$INITRAMFS/lib/modules/$name.ko"
        echo "$name" >>"$INITRAMFS/modules.order"
    done < <(in_chroot modprobe -S "$KABI" --show-depends "$mod")
done
cat >"$INITRAMFS/init" <<'INITRAMFS_INIT'
#!/bin/busybox sh
# initramfs /init of the pyovpn test guest (written by scripts/guest/build.sh): load the modules
# listed in /modules.order, mount the root disk and hand over to the guest's own init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m.ko" || echo "initramfs: insmod $m failed"; done </modules.order
root=/dev/vda
i=0
while [ ! -b "$root" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "initramfs: cannot mount $root"
    echo o >/proc/sysrq-trigger
    sleep 30
fi
umount /proc /dev
exec switch_root /newroot /usr/local/sbin/pyovpn-guest-init
INITRAMFS_INIT
chmod 755 "$INITRAMFS/init"
(cd "$INITRAMFS" && find . -print0 | cpio --null -o -H newc --quiet) >"$WORK/initrd.cpio"
log "initramfs modules: $(tr '\n' ' ' <"$INITRAMFS/modules.order")"

# --- 10. root filesystem image -------------------------------------------------------------------------
stage "rootfs.img"
VMLINUZ=""
for f in "$ROOT/boot/vmlinuz-$KABI" "$ROOT/usr/lib/modules/$KABI/vmlinuz"; do
    if [ -f "$f" ]; then VMLINUZ=$f; break; fi
done
[ -n "$VMLINUZ" ] || die "no vmlinuz for $KABI in the rootfs"
cp "$VMLINUZ" "$WORK/vmlinuz"
# shellcheck disable=SC2016  # ${Version} is dpkg-query's format syntax
{
    echo "stamp:        $STAMP (built $(date -u +%FT%TZ))"
    echo "kernel:       $KABI ($(in_chroot dpkg-query -W -f '${Version}' "linux-binary-$KABI"))"
    echo "openvpn:      $OPENVPN_VERSION"
    echo "iproute2:     $(in_chroot dpkg-query -W -f '${Version}' iproute2)"
    in_chroot python3 -c '
import sys, importlib.metadata as md
print("%-13s %s" % ("python:", sys.version.split()[0]))
for line in sys.argv[1].splitlines():
    dist = line.split()[0]
    print("%-13s %s" % (dist + ":", md.version(dist)))' "$PY_REQS"
} >"$WORK/manifest.txt"
umount "$ROOT/var/cache/apt/archives"
in_chroot apt-get clean
umount "$ROOT/proc"
# nothing in the guest can use these (no network), so leave them out of the image
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
ROOT_MIB=$(du -sm "$ROOT" | cut -f1)
IMG_MIB=$(( ROOT_MIB * 13 / 10 + 512 ))   # free space for what tests write outside /tmp (copy-on-write)
mke2fs -q -t ext4 -L pyovpn-guest -d "$ROOT" "$WORK/rootfs.img" "${IMG_MIB}M" >/dev/null

# --- 11. publish: img-<stamp>, then swap the `current` link -----------------------------------------------
stage "publish"
IMG=$CACHE/img-$STAMP
rm -rf "$IMG.new"
mkdir "$IMG.new"
mv "$WORK/vmlinuz" "$WORK/initrd.cpio" "$WORK/rootfs.img" "$WORK/manifest.txt" "$IMG.new/"
echo "$STAMP" >"$IMG.new/stamp"
rm -rf "$IMG"
mv "$IMG.new" "$IMG"
ln -sfn "img-$STAMP" "$CACHE/current.new"
mv -T "$CACHE/current.new" "$CACHE/current"
# Older images: a qemu still running from one keeps its open files, so they can go now.
for old in "$CACHE"/img-*; do
    [ "$old" = "$IMG" ] || rm -rf "$old"
done
rm -rf --one-file-system "$WORK"
log "   ... $STAGE_NAME took $(secs_since "$STAGE_T") s"
log "guest image: $IMG"
sed 's/^/build.sh:   /' "$IMG/manifest.txt"
log "sizes: vmlinuz $(mib "$IMG/vmlinuz") MiB," \
    "initrd.cpio $(du -k --apparent-size "$IMG/initrd.cpio" | cut -f1) KiB," \
    "rootfs.img $(mib "$IMG/rootfs.img") MiB ($(du -sm "$IMG/rootfs.img" | cut -f1) MiB allocated;" \
    "rootfs tree $ROOT_MIB MiB)"
log "downloads: $(( $(mib "$DL") - DL_MIB_BEFORE )) MiB this build, cache $DL holds $(mib "$DL") MiB"
log "done in $(secs_since "$T0") s"
