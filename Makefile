# Tandem: `make setup` installs everything (idempotent), `make demo` shows it working, `make test` checks it.

VENV   := .venv
PY     := $(VENV)/bin/python
STUBS  := protos/cri_pb2.py protos/cri_pb2_grpc.py protos/agent_pb2.py

# Debian packages Tandem and its tests use, each for a reason:
#   docker-registry        the local OCI registry the tests and the demo pull from
#   busybox-static         the one binary inside every test and demo image
#   runc, conmon           the trusted backend: the OCI runtime and CRI-O's per-container monitor
#   catatonit              the static pause process that holds a trusted pod's namespaces
#   containernetworking-plugins, iptables  CNI plugins (bridge, host-local, loopback, portmap)
#   python3-venv           the project's virtualenv
#   iproute2, iputils-ping, util-linux, procps  ip, ping, mount/unshare/nsenter, ps
#   qemu-system-x86        the untrusted backend's micro-VMs (its qemu-system-common dependency ships virtiofsd)
#   lz4                    unpacks the guest kernel (Debian compresses it with LZ4) for PVH boot
#   e2fsprogs              mkfs.ext4 -d builds the guest's userland image (ext4, mapped by every VM with DAX)
#                          from a directory, without root or a loop mount
#   systemd                systemd-analyze, which checks the unit `make install` installs (tests/integration/
#                          test_install.py); the daemon itself needs no systemd
#   (the guest kernel, busybox, Python and crun inside the VMs are fetched by `tandem assets` with
#   apt-get download and unpacked into the state dir, never installed on the host)
APT_PACKAGES := docker-registry busybox-static runc conmon catatonit containernetworking-plugins \
                iptables python3-venv iproute2 iputils-ping util-linux procps ca-certificates qemu-system-x86 lz4 \
                e2fsprogs systemd

# `make install` puts Tandem where an operator's node runs it (as root; under DESTDIR for packaging):
# the program and its modules, the systemd unit, the config file (only if absent), RuntimeClasses and
# kubelet drop-in examples. `make uninstall` removes what the install recorded. packaging/install.sh does both.
DESTDIR    ?=
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib
UNITDIR    ?= $(PREFIX)/lib/systemd/system
DATADIR    ?= $(PREFIX)/share
SYSCONFDIR ?= /etc
SOCKET     ?= /run/tandem/tandem.sock
PYTHON3    ?= /usr/bin/python3
INSTALL_ENV = DESTDIR="$(DESTDIR)" BINDIR="$(BINDIR)" LIBDIR="$(LIBDIR)" UNITDIR="$(UNITDIR)" DATADIR="$(DATADIR)" \
              SYSCONFDIR="$(SYSCONFDIR)" SOCKET="$(SOCKET)" PY="$(abspath $(PY))" PYTHON3="$(PYTHON3)"

.PHONY: setup apt venv protos assets demo test typecheck lint clean install uninstall

setup: apt venv protos assets

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: $(STUBS)

$(STUBS): protos/cri.proto protos/agent.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/cri.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. protos/agent.proto

# The VM guest's kernel, initramfs and userland image (rebuilt only when an input changed) and the accelerator probe.
assets: apt venv protos
	$(VENV)/bin/tandem assets

demo: setup
	$(PY) -m demo

test: setup typecheck
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# mypy (configured in pyproject.toml): strict on core/ (with the settings), images/, sandbox/oci/ and
# vm_backend/guest_image/; the default level elsewhere.
typecheck: venv protos
	$(PY) -m mypy

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

install: venv protos
	$(INSTALL_ENV) sh packaging/install.sh install

uninstall:
	$(INSTALL_ENV) sh packaging/install.sh uninstall

clean:
	rm -rf $(VENV) $(STUBS) protos/*_pb2.pyi
