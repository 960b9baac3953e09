#!/usr/bin/env bash
# Install cxr-node from this checkout as a systemd service. `make install-service` runs it, as root.
# Idempotent: run it again to upgrade (package, demo models, unit); /etc/cxr-node/node.yaml is never overwritten.
# Two modes: the single-host node (cxr-node.service, every role; the default), or with ROLES some roles of a
# scale-out node on one PostgreSQL and one shared storage root (docs/scale-out.md, systemd).
#
#   /opt/cxr-node/.venv           virtual environment with cxr-node (torch 2.14.1, torchvision 0.29.1 pinned)
#   /opt/cxr-node/models          the checkout's models/ (demo models, keidar2021.yaml); replaced on upgrade
#   /opt/cxr-node/node.yaml.example  the checkout's config/node.yaml, to compare with yours after an upgrade
#   /etc/cxr-node/node.yaml       your configuration (created once from config/node.yaml)
#   /var/lib/cxr-node             state: inbox, jobs database, ... (owned by the cxr-node user)
#   /usr/local/bin/cxr-node       the CLI with the service's configuration (cxr-node status, echo, send)
#   /etc/systemd/system/cxr-node.service (+ cxr-node.service.d/gpu.conf with GPU=1)
#   /var/lib/cxr-node/identifier.key   the site's key for hashing Patient IDs (created once)
#
# With ROLES (scale-out), instead of the last two:
#   /etc/systemd/system/cxr-node-<role>.service for each role (+ cxr-node-worker.service.d/gpu.conf with GPU=1),
#                    verified and enabled, not started; cxr-node.service is neither installed nor enabled
#   /usr/local/bin/cxr-node-cluster   the CLI with the role units' environment (status, db upgrade, db migrate)
#   /etc/cxr-node/database.env        the database URL (root:cxr-node 0640), created once from the example
#   /etc/cxr-node/db-password         the database password (root:root 0600), created once, empty
#   no identifier key: it lives on the shared storage root
#
# Environment:
#   ROLES            scale-out: the roles of this host, any of "receiver worker sender" (space-separated)
#   GPU=1            also install the NVIDIA drop-in (an existing drop-in is kept up to date without it)
#   CXR_NODE_UID, CXR_NODE_GID   numeric ids for the cxr-node user and group when they are created (the same on
#                    every host of a scale-out node); an existing user or group with other ids is refused
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
readonly ALL_ROLES=(receiver worker sender)
readonly SHARED_ROOT=/srv/cxr-node
readonly CXR_NODE_UID=${CXR_NODE_UID:-}
readonly CXR_NODE_GID=${CXR_NODE_GID:-}
ROLES_WANTED=()

say() { printf 'install-service: %s\n' "$*"; }
die() { printf 'install-service: error: %s\n' "$*" >&2; exit 1; }
staged() { [[ -n $DESTDIR ]]; }
scale_out() { [[ ${#ROLES_WANTED[@]} -gt 0 ]]; }
wants() { [[ " ${ROLES_WANTED[*]} " == *" $1 "* ]]; }

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
    local id
    for id in "$CXR_NODE_UID" "$CXR_NODE_GID"; do
        [[ -z $id || $id =~ ^[1-9][0-9]*$ ]] || die "CXR_NODE_UID and CXR_NODE_GID are numeric ids above 0, not '$id'"
    done
    parse_roles
    if scale_out && ! staged; then
        check_no_running_node
    fi
}

# ROLES: the words of the environment variable, each one of ALL_ROLES, each once, into ROLES_WANTED.
parse_roles() {
    local role words
    read -r -a words <<<"${ROLES:-}"
    for role in "${words[@]}"; do
        [[ " ${ALL_ROLES[*]} " == *" $role "* ]] || die "ROLES: unknown role '$role' (any of: ${ALL_ROLES[*]})"
        wants "$role" || ROLES_WANTED+=("$role")
    done
    if [[ -n ${ROLES:-} ]] && ! scale_out; then
        die "ROLES is empty: name this host's roles, any of: ${ALL_ROLES[*]}"
    fi
    if scale_out; then
        say "scale-out roles of this host: ${ROLES_WANTED[*]}"
    fi
}

# Scale-out: never under a running node. The venv is replaced beneath running processes, and roles of two
# versions side by side are not promised (docs/scale-out.md, Upgrading later); cxr-node.service and the role
# units conflict.
check_no_running_node() {
    local role running=()
    if systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl is-active --quiet "$UNIT" 2>/dev/null; then
        die "$UNIT (the single-host node) is enabled or running here: systemctl disable --now cxr-node first"
    fi
    for role in "${ALL_ROLES[@]}"; do
        if systemctl is-active --quiet "cxr-node-$role.service" 2>/dev/null; then
            running+=("cxr-node-$role")
        fi
    done
    if [[ ${#running[@]} -gt 0 ]]; then
        die "running here: ${running[*]}; stop every role on every host before an upgrade: systemctl stop ${running[*]}"
    fi
}

create_user() {
    if staged; then
        say "DESTDIR set: not creating the $SERVICE_USER user"
        return
    fi
    local entry group_args=(--user-group) uid_args=()
    if entry=$(getent group "$SERVICE_USER"); then
        check_id "group" "$(cut -d: -f3 <<<"$entry")" "$CXR_NODE_GID" CXR_NODE_GID
        group_args=(--gid "$SERVICE_USER")
    elif [[ -n $CXR_NODE_GID ]]; then
        groupadd --system --gid "$CXR_NODE_GID" "$SERVICE_USER"
        say "created system group $SERVICE_USER (gid $CXR_NODE_GID)"
        group_args=(--gid "$SERVICE_USER")
    fi
    if entry=$(getent passwd "$SERVICE_USER"); then
        check_id "user" "$(cut -d: -f3 <<<"$entry")" "$CXR_NODE_UID" CXR_NODE_UID
        say "user $SERVICE_USER exists"
        return
    fi
    [[ -z $CXR_NODE_UID ]] || uid_args=(--uid "$CXR_NODE_UID")
    useradd --system "${group_args[@]}" "${uid_args[@]}" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "cxr-node DICOM node" "$SERVICE_USER"
    say "created system user $SERVICE_USER ($(id "$SERVICE_USER"))"
}

# $1 = user or group, $2 = its id here, $3 = the id wanted (may be empty: any), $4 = the variable that set it.
check_id() {
    if [[ -n $3 && $2 != "$3" ]]; then
        die "$1 $SERVICE_USER exists with id $2, not $4=$3: every host must use the same ids (docs/scale-out.md)"
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
    local root=$STATE_DIR
    if scale_out; then
        root=$SHARED_ROOT
    fi
    CXR_NODE_STORAGE__ROOT=$root "$DESTDIR$PREFIX/.venv/bin/cxr-node" config check --config "$conf"
}

install_state() {
    if staged; then
        install -d -m 0750 "$DESTDIR$STATE_DIR"
    else
        install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
        # the site's secret key for hashing Patient IDs: created once, owner-only, kept across upgrades; a
        # scale-out node's is on the shared storage root, the same for every host
        if ! scale_out && [ ! -e "$STATE_DIR/identifier.key" ]; then
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

# Scale-out: the units of ROLES_WANTED (and updates of the other role units already here), the GPU drop-in of the
# worker, the cluster CLI, and the database settings, created once. Enables the units; starts nothing.
install_roles() {
    local unit_dir=$DESTDIR$UNIT_DIR role unit
    local dropin=$unit_dir/cxr-node-worker.service.d/gpu.conf
    install -d -m 0755 "$unit_dir"
    for role in "${ALL_ROLES[@]}"; do
        unit=cxr-node-$role.service
        if wants "$role" || [[ -e $unit_dir/$unit ]]; then
            install -m 0644 "$SRC/systemd/$unit" "$unit_dir/$unit"
            say "installed $UNIT_DIR/$unit"
        fi
    done
    if [[ -e $dropin ]] || { [[ $GPU == 1 ]] && wants worker; }; then
        install -d -m 0755 "${dropin%/*}"
        install -m 0644 "$SRC/systemd/cxr-node-gpu.conf" "$dropin"
        say "installed the GPU drop-in $UNIT_DIR/cxr-node-worker.service.d/gpu.conf"
    elif [[ $GPU == 1 ]]; then
        say "GPU=1 without the worker role: no GPU drop-in"
    fi
    install -d -m 0755 "$DESTDIR/usr/local/bin"
    install -m 0755 "$SRC/deploy/systemd/cxr-node-cluster" "$DESTDIR/usr/local/bin/cxr-node-cluster"
    local env_file=$DESTDIR$CONF_DIR/database.env password=$DESTDIR$CONF_DIR/db-password
    if [[ -e $env_file ]]; then
        say "kept $CONF_DIR/database.env"
    else
        put 0640 "$SERVICE_USER" "$SRC/deploy/systemd/database.env.example" "$env_file"
        say "wrote $CONF_DIR/database.env: set the URL of your PostgreSQL database in it"
    fi
    if [[ -e $password ]]; then
        say "kept $CONF_DIR/db-password"
    else
        put 0600 root /dev/null "$password"
        say "created an empty $CONF_DIR/db-password: put the database password in it (one line)"
    fi
    local units=()
    for role in "${ROLES_WANTED[@]}"; do
        units+=("cxr-node-$role.service")
    done
    if staged; then
        say "DESTDIR set: not calling systemctl; files staged under $DESTDIR"
        return
    fi
    [[ -d /run/systemd/system ]] || die "systemd is not running here: files installed, units not enabled"
    local paths=()
    for unit in "${units[@]}"; do
        paths+=("$UNIT_DIR/$unit")
    done
    systemd-analyze verify "${paths[@]}"
    systemctl daemon-reload
    systemctl enable "${units[@]}"
    say "enabled ${units[*]} (not started). Mount $SHARED_ROOT, fill in $CONF_DIR/database.env and"
    say "$CONF_DIR/db-password, run 'cxr-node-cluster db upgrade' once for all hosts, then: systemctl start ${units[*]}"
}

main() {
    check_environment
    create_user
    install_venv
    install_files
    install_config
    install_state
    if scale_out; then
        install_roles
    else
        install_unit
    fi
}

main "$@"
