#!/bin/sh
# `make install` and `make uninstall`: Tandem for an operator, under $DESTDIR if set.
#
#   packaging/install.sh install|uninstall
#
# Directories and programs come from the environment (the Makefile sets them all): DESTDIR, BINDIR,
# LIBDIR, UNITDIR, SYSCONFDIR, DATADIR, SOCKET, PY (the build venv's python: it runs pip and renders
# the config and RuntimeClass files) and PYTHON3 (the system interpreter the installed `tandem` runs on).
#
# install records every file and every directory it made in $DATADIR/tandem/installed; uninstall
# removes exactly those (directories only when empty), so an install followed by an uninstall leaves
# the tree as it was. The config file is the operator's: it is written only when absent, and removed
# only when it is still the file install wrote.
set -eu

: "${DESTDIR=}" "${BINDIR:?}" "${LIBDIR:?}" "${UNITDIR:?}" "${SYSCONFDIR:?}" "${DATADIR:?}" "${SOCKET:?}"
: "${PY:?}" "${PYTHON3:?}"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
share="$DATADIR/tandem"
manifest="$DESTDIR$share/installed"
config="$SYSCONFDIR/tandem/tandem.toml"

record() { printf '%s %s\n' "$1" "$2" >>"$work/installed"; }

# make_dir DIR: create DIR (under DESTDIR) and each missing parent, recording the ones made
make_dir() {
    if [ ! -d "$DESTDIR$1" ]; then
        make_dir "$(dirname "$1")"
        mkdir -m 0755 "$DESTDIR$1"
        record dir "$1"
    fi
}

# put MODE SOURCE DEST: install one file, recording it
put() {
    make_dir "$(dirname "$3")"
    install -m "$1" "$2" "$DESTDIR$3"
    record file "$3"
}

# render TEMPLATE: the template with the install's directories filled in
render() {
    sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" \
        -e "s|@DATADIR@|$DATADIR|g" -e "s|@SOCKET@|$SOCKET|g" -e "s|@PYTHON3@|$PYTHON3|g" "$1"
}

install_all() {
    if [ -e "$manifest" ]; then
        echo "install: $manifest exists: run \`make uninstall\` first" >&2
        exit 1
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    : >"$work/installed"

    # Tandem's modules and their dependencies, for the system Python (the venv's is the same version),
    # built from a copy: setuptools would leave its build/ directory in the checkout
    make_dir "$LIBDIR"
    mkdir "$work/src"
    (cd "$root" && cp -R pyproject.toml README.md core cri sandbox images runc_backend vm_backend protos "$work/src/")
    find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
    "$PY" -m pip install --quiet --no-warn-script-location --disable-pip-version-check \
        --target "$DESTDIR$LIBDIR/tandem" "$work/src"
    rm -rf "$DESTDIR$LIBDIR/tandem/bin"
    record tree "$LIBDIR/tandem"
    render "$here/tandem.in" >"$work/tandem"
    put 0755 "$work/tandem" "$BINDIR/tandem"

    render "$here/tandem.service.in" >"$work/tandem.service"
    put 0644 "$work/tandem.service" "$UNITDIR/tandem.service"

    "$PY" -m cri.cli config default >"$work/tandem.toml"
    put 0644 "$work/tandem.toml" "$share/tandem.toml.default"
    if [ -e "$DESTDIR$config" ]; then
        echo "install: $DESTDIR$config exists: kept (the defaults are in $share/tandem.toml.default)"
    else
        put 0644 "$work/tandem.toml" "$config"
    fi
    "$PY" -m cri.cli config runtimeclasses --config "$DESTDIR$config" >"$work/runtimeclasses.yaml"
    put 0644 "$work/runtimeclasses.yaml" "$share/runtimeclasses.yaml"
    render "$here/kubelet-tandem.conf.in" >"$work/kubelet.conf"
    put 0644 "$work/kubelet.conf" "$share/kubelet.service.d/20-tandem.conf"
    render "$here/kubelet-tandem.yaml.in" >"$work/kubelet.yaml"
    put 0644 "$work/kubelet.yaml" "$share/kubelet.conf.d/20-tandem.conf"
    put 0644 "$root/README.md" "$share/README.md"

    record file "$share/installed"
    install -m 0644 "$work/installed" "$manifest"
    echo "installed Tandem under ${DESTDIR:-/}: $BINDIR/tandem, $UNITDIR/tandem.service, $config"
    echo "next: systemctl daemon-reload && systemctl enable --now tandem; kubectl apply -f $share/runtimeclasses.yaml"
}

uninstall_all() {
    if [ ! -e "$manifest" ]; then
        echo "uninstall: no $manifest: nothing installed here" >&2
        exit 1
    fi
    entries=$(cat "$manifest")
    config_changed=yes
    if cmp -s "$DESTDIR$config" "$DESTDIR$share/tandem.toml.default"; then config_changed=no; fi
    # files and trees first, then the directories install made, deepest first
    printf '%s\n' "$entries" | while read -r kind path; do
        case "$kind" in
        tree) case "$path" in */tandem) rm -rf "$DESTDIR$path" ;; esac ;;  # only ever LIBDIR/tandem
        file)
            if [ "$path" = "$config" ] && [ "$config_changed" = yes ]; then
                echo "uninstall: $DESTDIR$path was changed: kept"
            elif [ "$path" != "$share/installed" ]; then
                rm -f "$DESTDIR$path"
            fi
            ;;
        esac
    done
    rm -f "$manifest"
    printf '%s\n' "$entries" | sed -n 's/^dir //p' | sort -r | while read -r path; do
        rmdir "$DESTDIR$path" 2>/dev/null || echo "uninstall: $DESTDIR$path is not empty: kept"
    done
    echo "uninstalled Tandem from ${DESTDIR:-/}"
}

case "${1:-}" in
install) install_all ;;
uninstall) uninstall_all ;;
*)
    echo "usage: $0 install|uninstall" >&2
    exit 2
    ;;
esac
