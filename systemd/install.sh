#!/usr/bin/env bash
# Install cxr-node from this checkout as a systemd service. `make install-service` runs it, as root.
# Idempotent: run it again to upgrade (package, demo models, unit); /etc/cxr-node/node.yaml is never overwritten.
#
#   /opt/cxr-node/.venv           virtual environment with cxr-node (torch 2.14.1, torchvision 0.29.1 pinned)
#   /opt/cxr-node/models          the checkout's models/ (demo models, keidar2021.yaml); replaced on upgrade
#   /opt/cxr-node/node.yaml.example  the checkout's config/node.yaml, to compare with yours after an upgrade
#   /etc/cxr-node/node.yaml       your configuration (created once from config/node.yaml)
#   /var/lib/cxr-node             state: inbox, jobs database, ... (owned by the cxr-node user)
#   /usr/local/bin/cxr-node       the CLI with the service's configuration (cxr-node status, echo, send)
#   /etc/systemd/system/cxr-node.service (+ cxr-node.service.d/gpu.conf with GPU=1)
#
# Environment:
#   GPU=1            also install the NVIDIA drop-in (an existing drop-in is kept up to date without it)
#   SERVICE_PYTHON   interpreter for the venv (default /usr/bin/python3, 3.11 or later); not under /home or
#                    /root, which the unit hides (ProtectHome=yes)
#   DESTDIR          stage the files under this folder instead of / (tests, packaging): no user is created,
#                    nothing is chowned, systemctl is not called
#   PIP_INDEX_URL, PIP_FIND_LINKS, ...   pip's own variables, for a mirror or a wheel folder
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly SRC
readonly DESTDIR=${DESTDIR:-}
readonly GPU=${GPU:-0}
readonly SERVICE_PYTHON=${SERVICE_PYTHON:-/usr/bin/python3}
readonly SERVICE_USER=cxr-node
readonly PREFIX=/opt/cxr-node
readonly CONF_DIR=/etc/cxr-node
readonly STATE_DIR=/var/lib/cxr-node
readonly UNIT_DIR=/etc/systemd/system
readonly UNIT=cxr-node.service
readonly TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

say() { printf 'install-service: %s\n' "$*"; }
die() { printf 'install-service: error: %s\n' "$*" >&2; exit 1; }
staged() { [[ -n $DESTDIR ]]; }

# install(1) with owner/group only on a real install; $1 = mode, $2 = group, the rest as for install(1).
put() {
    local mode=$1 group=$2
    shift 2
    if staged; then
        install -m "$mode" "$@"
    else
        install -m "$mode" -o root -g "$group" "$@"
    fi
}

check_environment() {
    if ! staged && [[ $(id -u) -ne 0 ]]; then
        die "run as root (sudo make install-service), or set DESTDIR to stage the files"
    fi
    [[ -x $SERVICE_PYTHON ]] || die "SERVICE_PYTHON=$SERVICE_PYTHON: not an executable"
    "$SERVICE_PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' ||
        die "$SERVICE_PYTHON: needs Python 3.11 or later with the venv module (apt-get install python3-venv)"
    local base
    base=$("$SERVICE_PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
    case $base/ in
        /home/* | /root/*) die "$SERVICE_PYTHON lives under $base, which the unit hides (ProtectHome=yes); set SERVICE_PYTHON=/usr/bin/python3" ;;
    esac
}

create_user() {
    if staged; then
        say "DESTDIR set: not creating the $SERVICE_USER user"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    else
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "cxr-node DICOM node" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
}

install_venv() {
    local venv=$DESTDIR$PREFIX/.venv
    install -d -m 0755 "$DESTDIR$PREFIX"
    [[ -x $venv/bin/python ]] || "$SERVICE_PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${TORCH_PINS[@]}"
    # From a copy of the checkout, so the build leaves nothing in it; a directory is always reinstalled.
    local build
    build=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "rm -rf '$build'" EXIT
    cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/cxr_node" "$build/"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$build"
    say "installed $("$venv/bin/cxr-node" --version) in $venv"
}

install_files() {
    local models=$DESTDIR$PREFIX/models
    rm -rf "$models.new"
    cp -R "$SRC/models" "$models.new"
    chmod -R u=rwX,go=rX "$models.new"
    rm -rf "$models"
    mv "$models.new" "$models"
    install -d -m 0755 "$DESTDIR$PREFIX/docs"
    install -m 0644 "$SRC"/docs/*.md "$DESTDIR$PREFIX/docs/"
    install -m 0644 "$SRC/config/node.yaml" "$DESTDIR$PREFIX/node.yaml.example"
    install -d -m 0755 "$DESTDIR/usr/local/bin"
    cat >"$DESTDIR/usr/local/bin/cxr-node.new" <<EOF
#!/bin/sh
# Installed by cxr-node's systemd/install.sh: the cxr-node CLI with the service's configuration.
export CXR_NODE_CONFIG="\${CXR_NODE_CONFIG:-$CONF_DIR/node.yaml}"
export CXR_NODE_STORAGE__ROOT="\${CXR_NODE_STORAGE__ROOT:-$STATE_DIR}"
exec $PREFIX/.venv/bin/cxr-node "\$@"
EOF
    chmod 0755 "$DESTDIR/usr/local/bin/cxr-node.new"
    mv "$DESTDIR/usr/local/bin/cxr-node.new" "$DESTDIR/usr/local/bin/cxr-node"
}

install_config() {
    local conf=$DESTDIR$CONF_DIR/node.yaml
    put 0750 "$SERVICE_USER" -d "$DESTDIR$CONF_DIR"
    if [[ -e $conf ]]; then
        say "kept $CONF_DIR/node.yaml (compare with $PREFIX/node.yaml.example after an upgrade)"
    else
        local new=$conf.new
        sed "s#^\(  manifest: \)models/#\1$PREFIX/models/#" "$SRC/config/node.yaml" >"$new"
        grep -q "^  manifest: $PREFIX/models/" "$new" || die "could not set models.manifest in $new"
        put 0640 "$SERVICE_USER" "$new" "$conf"
        rm -f "$new"
        say "wrote $CONF_DIR/node.yaml: set node.ae_title, allowed_calling_aets and destinations for your PACS"
    fi
    CXR_NODE_STORAGE__ROOT=$STATE_DIR "$DESTDIR$PREFIX/.venv/bin/cxr-node" config check --config "$conf"
}

install_state() {
    if staged; then
        install -d -m 0750 "$DESTDIR$STATE_DIR"
    else
        install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
        # the site's secret key for hashing Patient IDs: created once, owner-only, kept across upgrades
        if [ ! -e "$STATE_DIR/identifier.key" ]; then
            (umask 077 && head -c 32 /dev/urandom > "$STATE_DIR/identifier.key")
            chown "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR/identifier.key"
        fi
    fi
}

install_unit() {
    local unit_dir=$DESTDIR$UNIT_DIR dropin=$DESTDIR$UNIT_DIR/$UNIT.d/gpu.conf
    install -d -m 0755 "$unit_dir"
    install -m 0644 "$SRC/systemd/$UNIT" "$unit_dir/$UNIT"
    if [[ $GPU == 1 || -e $dropin ]]; then
        install -d -m 0755 "$unit_dir/$UNIT.d"
        install -m 0644 "$SRC/systemd/cxr-node-gpu.conf" "$dropin"
        say "installed the GPU drop-in $UNIT_DIR/$UNIT.d/gpu.conf"
    fi
    if staged; then
        say "DESTDIR set: not calling systemctl; files staged under $DESTDIR"
        return
    fi
    [[ -d /run/systemd/system ]] || die "systemd is not running here: files installed, unit not enabled"
    systemd-analyze verify "$UNIT_DIR/$UNIT"
    systemctl daemon-reload
    systemctl enable "$UNIT"
    systemctl try-restart "$UNIT"
    say "enabled $UNIT (a running node was restarted). Start it with: systemctl start cxr-node"
}

main() {
    check_environment
    create_user
    install_venv
    install_files
    install_config
    install_state
    install_unit
}

main "$@"
