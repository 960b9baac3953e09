#!/usr/bin/env bash
# Run the node, installed by install.sh into a DESTDIR stage, the way cxr-node.service confines it, and feed
# it chest phantoms: proves PyTorch, multiprocessing spawn and SQLite work under the unit's hardening without
# systemd as PID 1 (containers, CI). As root on Linux; needs python3-seccomp, dcmtk, iproute2, util-linux.
#
#   systemd/sandbox/check.sh STAGE [--unit EXTRA.conf] [--kill]
#
# Emulated: user nobody; read-only /; private /tmp; empty /root and /home; writable state only; private
# network namespace (loopback); the unit's system call filter, MemoryDenyWriteExecute=, address families and
# namespaces (unit_seccomp.py). Not emulated: PrivateDevices, PrivateUsers, ProtectKernel*, the cgroup limits.
# Exit status 0 when every phantom was stored and analysed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
STAGE=$(realpath "${1:?usage: check.sh STAGE [--unit EXTRA.conf] [--kill]}")
readonly STAGE
shift
UNITS=("$HERE/../cxr-node.service")
KILL=()
while (($#)); do
    case $1 in
        --unit) UNITS+=("$2"); shift 2 ;;
        --kill) KILL=(--kill); shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

[[ -x $STAGE/opt/cxr-node/.venv/bin/python ]] || { echo "no staged install: DESTDIR=$STAGE bash systemd/install.sh" >&2; exit 2; }
WORK=$(mktemp -d /dev/shm/cxr-sandbox.XXXXXX)   # /dev/shm stays visible under the private /tmp
readonly WORK
trap 'rm -rf "$WORK"' EXIT
install -d -m 0750 -o nobody -g nogroup "$WORK/state"
cp "$HERE/unit_seccomp.py" "$STAGE/etc/cxr-node/node.yaml" "$WORK/"
FILTER_ARGS=("${KILL[@]}")
for i in "${!UNITS[@]}"; do   # copies: the private /tmp below hides the originals if they live in /tmp
    cp "${UNITS[$i]}" "$WORK/unit-$i.conf"
    FILTER_ARGS+=(--unit "$WORK/unit-$i.conf")
done
chmod 0644 "$WORK/node.yaml"
"$STAGE/opt/cxr-node/.venv/bin/cxr-node" phantoms --n 4 --size 384 --out "$WORK/phantoms" >/dev/null
chmod -R a+rX "$WORK"

export STAGE WORK
export FILTER="${FILTER_ARGS[*]}"
# shellcheck disable=SC2016  # the script below expands its variables itself, inside the namespaces
unshare --mount --net --propagation private bash -euo pipefail -c '
ip link set lo up
mount --bind "$STAGE" /mnt && mount -o remount,bind,ro /mnt
mount --bind "$WORK/state" "$WORK/state"
mount -o remount,bind,ro /
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /root
mount -t tmpfs tmpfs /home
py=/mnt/opt/cxr-node/.venv/bin/python
export CXR_NODE_CONFIG=$WORK/node.yaml CXR_NODE_STORAGE__ROOT=$WORK/state CXR_NODE_LOGGING__FORMAT=json \
       CXR_NODE_MODELS__MANIFEST=/mnt/opt/cxr-node/models/demo/manifest.yaml CXR_NODE_NODE__HOST=127.0.0.1 \
       HOME=$WORK/state
cd /mnt/opt/cxr-node
# shellcheck disable=SC2086  # FILTER is a list of words
setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 "$WORK/unit_seccomp.py" $FILTER -- \
    "$py" -m cxr_node serve 2>"$WORK/node.log" &
node=$!
for _ in $(seq 180); do grep -q "\"node.ready\"" "$WORK/node.log" && break; kill -0 $node || break; sleep 1; done
grep -q "\"node.ready\"" "$WORK/node.log" || { echo "the node did not start:"; tail -20 "$WORK/node.log"; exit 1; }
storescu -aet PACS -aec CXR_NODE 127.0.0.1 11112 "$WORK"/phantoms/images/*.dcm
for _ in $(seq 120); do
    "$py" -m cxr_node status --json >"$WORK/status.json"
    "$py" -c "import json,sys; j=json.load(open(sys.argv[1]))[\"jobs\"]; sys.exit(j[\"queued\"]+j[\"running\"]+j[\"received\"] > 0 or sum(j.values()) < 4)" "$WORK/status.json" && break
    sleep 1
done
"$py" -m cxr_node status
kill -TERM $node && wait $node
grep -o "\"event\": \"[a-z_.]*\"" "$WORK/node.log" | sort | uniq -c
"$py" -c "import json,sys; j=json.load(open(sys.argv[1]))[\"jobs\"]; done=sum(j[s] for s in (\"inferred\",\"written\",\"delivered\")); print(f\"{done}/4 analysed\"); sys.exit(done != 4)" "$WORK/status.json"
'
