#!/usr/bin/env bash
# scripts/guest/run.sh - boots the guest that scripts/guest/build.sh built and runs one command in it.
#
# Owns: booting qemu and the per-run control directory (a temporary directory shared into the guest).
# The guest (linux 7.3.x with the ovpn module, trixie userspace) gets:
#   - this repository checkout, shared read-write over 9p at the SAME absolute path as on the host,
#     so paths printed or used by tests mean the same thing on both sides;
#   - `modprobe ovpn` done before the command starts;
#   - the command run as root by bash in the checkout's top directory, stdin /dev/null,
#     PYTHONPATH=<checkout>/src (so `python3 -m pyovpn` works without installing), PYOVPN_GUEST=1,
#     and any -e NAME=VALUE given here.
# No network devices besides lo: tests talk only inside the guest (namespaces, veth pairs).
# The serial console (kernel errors, the init's messages, the command's output) streams to stdout.
#
# Usage: scripts/guest/run.sh [-t TIMEOUT_S] [-m MEM_MB] [-c CPUS] [-a auto|kvm|tcg] [-e NAME=VALUE]... -- COMMAND...
#   One COMMAND word is a shell command line (`-- 'cd tests && pytest -q'`); several words are run
#   exactly as given (`-- python3 -c 'print(1)'`).
#   -t  guest-side limit for COMMAND (default 600 s); the host gives the whole VM 180 s more
#   -a  auto (default): KVM when /dev/kvm is usable and not a PVM device, TCG otherwise, and TCG
#       again if the guest never started under KVM
# Environment: PYOVPN_GUEST_CACHE (where build.sh put the image; default /var/cache/pyovpn-guest).
# Exit status: COMMAND's exit status, or
#   124  COMMAND hit the guest-side timeout (-t)
#   125  no exit status came back: boot failure, kernel panic, or the host-side timeout
#   64   usage error;  69  no guest image or no qemu (run scripts/guest/build.sh)
set -euo pipefail

readonly CACHE=${PYOVPN_GUEST_CACHE:-/var/cache/pyovpn-guest}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
CHECKOUT=$(cd "$HERE/../.." && pwd -P)
readonly HERE CHECKOUT
readonly BOOT_MARGIN=180       # host-side allowance for boot and power-off on top of -t
readonly KVM_START_LIMIT=60    # seconds a KVM guest gets to reach its init before TCG takes over
readonly BOOT_ATTEMPTS=3       # boots tried when the guest dies before its init starts

usage() { sed -n '/^# Usage:/,/^# Exit status:/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 64; }
log() { echo "run.sh: $*" >&2; }

TIMEOUT=600
MEM=2048
CPUS=$(nproc)
ACCEL=auto
ENV_LINES=()
while getopts "t:m:c:a:e:h" opt; do
    case $opt in
        t) TIMEOUT=$OPTARG ;;
        m) MEM=$OPTARG ;;
        c) CPUS=$OPTARG ;;
        a) ACCEL=$OPTARG ;;
        e) [[ "$OPTARG" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage
           ENV_LINES+=("export ${OPTARG%%=*}=$(printf '%q' "${OPTARG#*=}")") ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" != "--" ] || shift
[ "$#" -gt 0 ] || usage
[[ "$TIMEOUT" =~ ^[0-9]+$ && "$MEM" =~ ^[0-9]+$ && "$CPUS" =~ ^[0-9]+$ ]] || usage
case $ACCEL in auto|kvm|tcg) ;; *) usage ;; esac

IMG=$(readlink -f "$CACHE/current" 2>/dev/null || true)
if [ -z "$IMG" ] || [ ! -s "$IMG/rootfs.img" ] || [ ! -s "$IMG/vmlinuz" ] || [ ! -s "$IMG/initrd.cpio" ]; then
    log "no guest image in $CACHE; build it first: scripts/guest/build.sh"
    exit 69
fi
QEMU=$(command -v qemu-system-x86_64 || true)
if [ -z "$QEMU" ]; then
    log "qemu-system-x86_64 is not installed; scripts/guest/build.sh installs it"
    exit 69
fi
# The image records what it was built from (build.sh and pyproject.toml's requirements).
STAMP_NOW=$("$HERE/build.sh" --print-stamp 2>/dev/null || true)
if [ "$(cat "$IMG/stamp" 2>/dev/null)" != "$STAMP_NOW" ]; then
    log "warning: the guest image is out of date (build.sh or pyproject.toml's requirements changed);" \
        "scripts/guest/build.sh rebuilds it"
fi

# $TMP/ctl is the control directory shared into the guest: run.sh -> guest (settings, command, env),
# guest -> run.sh (started, command-started, then exit-code or timed-out). $TMP/console is a FIFO.
TMP=$(mktemp -d /tmp/pyovpn-guest.XXXXXX)
CTL=$TMP/ctl
mkdir "$CTL"
mkfifo "$TMP/console"
QEMU_PID=""
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    # SIGTERM to timeout(1) is passed on to qemu
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
{
    printf 'PYOVPN_CHECKOUT=%q\n' "$CHECKOUT"
    printf 'PYOVPN_TIMEOUT=%q\n' "$TIMEOUT"
} >"$CTL/settings"
if [ "$#" -eq 1 ]; then
    printf '%s\n' "$1" >"$CTL/command"
else
    printf '%q ' "$@" >"$CTL/command"
    echo >>"$CTL/command"
fi
printf '%s\n' "${ENV_LINES[@]+"${ENV_LINES[@]}"}" >"$CTL/env"

pick_accel() {
    # /dev/kvm on a PVM host (kvm_pvm module) only runs PVM-enlightened guest kernels: a stock
    # kernel stops with "KVM internal error. Suberror: 1". Use TCG there.
    if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then echo kvm; else echo tcg; fi
}

boot() {  # $1 = kvm|tcg; streams the console; returns qemu's exit status (124: host-side timeout)
    local accel=$1 accel_args rc=0 sed_pid
    if [ "$accel" = kvm ]; then
        accel_args=(-accel kvm -cpu host)
    else
        accel_args=(-accel "tcg,thread=multi,tb-size=512" -cpu max)
    fi
    log "booting $(basename "$IMG") (accel=$accel, $CPUS cpus, ${MEM} MiB, timeout ${TIMEOUT}s);" \
        "$CHECKOUT is shared at the same path"
    rm -f "$CTL/started" "$CTL/command-started" "$CTL/exit-code" "$CTL/timed-out"
    # The serial console ends lines with CR LF; sed drops the CR so the output reads like a local run.
    sed -u 's/\r$//' <"$TMP/console" &
    sed_pid=$!
    # -nic none: no network device in the guest; snapshot=on: the image file itself is never written.
    timeout -k 10 $((TIMEOUT + BOOT_MARGIN)) "$QEMU" "${accel_args[@]}" -machine pc -smp "$CPUS" -m "$MEM" \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio -nic none \
        -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.cpio" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 root=/dev/vda" \
        -drive "file=$IMG/rootfs.img,if=virtio,format=raw,snapshot=on,cache=unsafe" \
        -virtfs "local,path=$CHECKOUT,mount_tag=pyovpnsrc,security_model=none,multidevs=remap,id=pyovpnsrc" \
        -virtfs "local,path=$CTL,mount_tag=pyovpnctl,security_model=none,id=pyovpnctl" \
        -device virtio-rng-pci \
        </dev/null >"$TMP/console" 2>&1 &
    QEMU_PID=$!
    if [ "$accel" = kvm ]; then
        # A guest that KVM cannot run may hang instead of exiting ("KVM internal error" pauses the VM):
        # give it KVM_START_LIMIT seconds to reach its init.
        local waited=0
        while kill -0 "$QEMU_PID" 2>/dev/null && [ ! -e "$CTL/started" ]; do
            if [ "$waited" -ge $((KVM_START_LIMIT * 10)) ]; then
                log "the guest did not reach its init within ${KVM_START_LIMIT}s under KVM; stopping qemu"
                kill "$QEMU_PID" 2>/dev/null || true
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=""
    wait "$sed_pid" || true
    return "$rc"
}

mtime() { stat -c %.3Y "$1" 2>/dev/null; }

REQUESTED_ACCEL=$ACCEL
[ "$ACCEL" != auto ] || ACCEL=$(pick_accel)
attempt=1
while :; do
    START=$(date +%s.%N)
    QRC=0
    boot "$ACCEL" || QRC=$?
    # Once the guest's init has started, what happens next belongs to the command: no retry.
    [ ! -e "$CTL/started" ] || break
    if [ "$REQUESTED_ACCEL" = auto ] && [ "$ACCEL" = kvm ]; then
        log "the guest did not start under KVM (qemu exit $QRC); retrying with TCG"
        ACCEL=tcg
        continue
    fi
    # Early boot under TCG occasionally dies (an oops while the kernel patches its own code on one
    # vCPU as the other runs it); a fresh boot is unaffected.
    if [ "$QRC" -eq 124 ] || [ "$attempt" -ge "$BOOT_ATTEMPTS" ]; then break; fi
    attempt=$((attempt + 1))
    log "the guest died before its init started (qemu exit $QRC); booting again ($attempt of $BOOT_ATTEMPTS)"
done
END=$(date +%s.%N)

timing="wall $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }') s"
if [ -e "$CTL/command-started" ]; then
    boot_s=$(awk -v a="$START" -v b="$(mtime "$CTL/command-started")" 'BEGIN { printf "%.1f", b - a }')
    timing+=", boot to command $boot_s s"
fi
if [ -s "$CTL/exit-code" ]; then
    RC=$(tr -dc '0-9' <"$CTL/exit-code")
    log "guest command exit status $RC ($timing, accel=$ACCEL)"
    exit "$RC"
elif [ -e "$CTL/timed-out" ]; then
    log "guest command TIMED OUT after ${TIMEOUT}s ($timing, accel=$ACCEL); exit 124"
    exit 124
else
    log "no exit status from the guest (qemu exit $QRC: boot failure, kernel panic or host-side timeout)" \
        "($timing, accel=$ACCEL); exit 125"
    exit 125
fi
