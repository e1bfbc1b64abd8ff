# kvmsnap: `make demo` and `make test` do all their own set-up, as root, on Debian 12.
# Both are idempotent: a second run installs nothing and reuses the cached demo guest.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages: QEMU and its tools, what the demo guest is built from, the filesystem
# checkers, restic, FUSE (disk exports without nbd), nbdcopy (restic's image stream),
# libvirt (its daemon for the tests, its headers for libvirt-python), borgbackup's build
# dependencies, and the remote-repository tests' servers (openssh-server's sshd and rclone's
# REST server, both started by the tests on 127.0.0.1 only and stopped after each test; the
# tests never touch the system's ssh service, but installing openssh-server enables and
# starts it on a host that runs systemd: `systemctl disable --now ssh` if it should not).
APT_PACKAGES := python3 python3-venv python3-dev build-essential \
	qemu-system-x86 qemu-system-common qemu-utils \
	e2fsprogs xfsprogs cpio kmod busybox-static util-linux fdisk debootstrap \
	restic fuse3 libnbd-bin libvirt-daemon-system libvirt-clients libvirt-dev \
	liblz4-dev libzstd-dev libxxhash-dev libacl1-dev libssl-dev pkg-config \
	dosfstools lvm2 curl ovmf openssh-server rclone nfs-ganesha nfs-ganesha-vfs
# libguestfs (files mode's route for LVM, LUKS, vfat, NTFS the host kernel cannot mount):
# installed without Recommends (they pull a desktop's worth of tools); the appliance's
# kernel is only a Recommends, so it is named here; ntfs-3g and btrfs-progs give the NTFS and
# btrfs verdicts (ntfsinfo, btrfs inspect-internal).
APT_PACKAGES_NO_RECOMMENDS := libguestfs-tools python3-guestfs linux-image-amd64 \
	ntfs-3g btrfs-progs

.PHONY: help deps venv guest qemu10 demo test lint bench clean install uninstall

help:
	@echo "make demo   - back up the running demo guest (sets everything up first)"
	@echo "make test   - run the test suite with real QEMU, borg, restic, borgmatic"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (results in bench/out)"
	@echo "make qemu10 - QEMU 10 from bookworm-backports in ~/.cache/kvmsnap/qemu-10 (not installed)"
	@echo "make clean  - remove the venv (the demo guest cache stays in ~/.cache/kvmsnap)"
	@echo "make install   - install kvmsnap for production: $(KVMSNAP_HOME)/venv, $(PREFIX)/bin/kvmsnap,"
	@echo "                 $(KVMSNAP_HOME)/hooks, the systemd units (EXTRAS=libvirt,tools adds those)"
	@echo "make uninstall - remove what make install put in place (not /etc/kvmsnap)"

# Each list: install what is missing (nothing when all are there), the second one without
# Recommends. Servers the tests run privately (nfs-ganesha, rpcbind, sshd, libvirtd) are not
# started by the install: a policy-rc.d answering 101 is in place while apt runs (only if
# the host has none of its own; removed afterwards).
deps:
	@$(call apt_install,$(APT_PACKAGES),)
	@$(call apt_install,$(APT_PACKAGES_NO_RECOMMENDS),--no-install-recommends)

define apt_install
	missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root)"; exit 2; fi; \
		echo "installing Debian packages:" $$missing; \
		policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then policy=/usr/sbin/policy-rc.d; \
			printf '#!/bin/sh\nexit 101\n' > $$policy; chmod 755 $$policy; \
			trap 'rm -f '$$policy EXIT; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing; \
	fi
endef

$(STAMP): pyproject.toml | deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[tools,dev,libvirt]'
	touch $@

venv: $(STAMP)

guest: venv
	$(BIN)/python -m kvmsnap_demo guest

# QEMU 10.0 beside the system's 7.2, for the version matrix (tests, benchmarks): unpacked into
# a private prefix once, never installed system-wide.
qemu10: venv
	$(BIN)/python -m kvmsnap_demo qemu10

demo: guest
	$(BIN)/python -m kvmsnap_demo demo

lint: venv
	$(BIN)/ruff check kvmsnap_plugin kvmsnap_demo tests bench

test: guest qemu10 lint
	$(BIN)/pytest -q --durations=25

bench: guest qemu10
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info

# -- a production install (pipx-like: kvmsnap in a venv of its own) -----------------------
# make install [PREFIX=/usr/local] [KVMSNAP_HOME=/opt/kvmsnap] [EXTRAS=libvirt,tools]
#              [DESTDIR=/tmp/stage]  (a staged install for packaging: paths inside the venv
#              are rewritten to the final ones; nothing outside DESTDIR is touched)
# The wheel carries the hook scripts, units and examples (PREFIX/share/kvmsnap of the venv);
# the paths the units and docs name are links into it, so an upgrade (make install again)
# never leaves an old hook script behind.
PREFIX ?= /usr/local
KVMSNAP_HOME ?= /opt/kvmsnap
SYSTEMD_DIR ?= /etc/systemd/system
CONFIG_DIR ?= /etc/kvmsnap
EXTRAS ?=
INSTALL_VENV := $(KVMSNAP_HOME)/venv
STAGED := $(DESTDIR)$(INSTALL_VENV)
SHARE := $(INSTALL_VENV)/share/kvmsnap
UNITS := kvmsnap-backup.service kvmsnap-backup.timer kvmsnap-verify.service kvmsnap-verify.timer

install:
	rm -rf $(STAGED)
	$(PYTHON) -m venv $(STAGED)
	$(STAGED)/bin/pip install -q --upgrade pip
	rm -rf build/wheel
	$(STAGED)/bin/pip wheel -q --no-deps -w build/wheel .
	$(STAGED)/bin/pip install -q $(if $(DESTDIR),--no-compile) "$$(ls build/wheel/kvmsnap_plugin-*.whl)$(if $(EXTRAS),[$(EXTRAS)])"
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlI --null -F '$(STAGED)' $(STAGED) | xargs -0 -r sed -i 's|$(STAGED)|$(INSTALL_VENV)|g'; \
	fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSTEMD_DIR) $(DESTDIR)$(CONFIG_DIR)
	ln -sfn $(INSTALL_VENV)/bin/kvmsnap $(DESTDIR)$(PREFIX)/bin/kvmsnap
	ln -sfn $(SHARE)/hooks $(DESTDIR)$(KVMSNAP_HOME)/hooks
	ln -sfn $(SHARE)/contrib $(DESTDIR)$(KVMSNAP_HOME)/contrib
	ln -sfn $(SHARE)/README.md $(DESTDIR)$(KVMSNAP_HOME)/README.md
	for unit in $(UNITS); do \
		sed 's|/usr/local/bin/kvmsnap|$(PREFIX)/bin/kvmsnap|g' $(DESTDIR)$(SHARE)/contrib/$$unit \
			> $(DESTDIR)$(SYSTEMD_DIR)/$$unit && chmod 0644 $(DESTDIR)$(SYSTEMD_DIR)/$$unit; \
	done
	install -m 0600 $(DESTDIR)$(SHARE)/contrib/kvmsnap.toml $(DESTDIR)$(CONFIG_DIR)/kvmsnap.toml.example
	@echo "installed: $(PREFIX)/bin/kvmsnap -> $(INSTALL_VENV), hooks in $(KVMSNAP_HOME)/hooks,"
	@echo "  units in $(SYSTEMD_DIR). Next: write $(CONFIG_DIR)/kvmsnap.toml (see the .example),"
	@echo "  secrets in $(CONFIG_DIR)/environment (0600), kvmsnap doctor, systemctl daemon-reload,"
	@echo "  systemctl enable --now kvmsnap-backup.timer"

# The configuration and secrets in CONFIG_DIR are the operator's: they stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/kvmsnap $(DESTDIR)$(CONFIG_DIR)/kvmsnap.toml.example
	rm -f $(foreach unit,$(UNITS),$(DESTDIR)$(SYSTEMD_DIR)/$(unit))
	rm -f $(DESTDIR)$(KVMSNAP_HOME)/hooks $(DESTDIR)$(KVMSNAP_HOME)/contrib $(DESTDIR)$(KVMSNAP_HOME)/README.md
	rm -rf $(STAGED)
	-rmdir $(DESTDIR)$(KVMSNAP_HOME) 2>/dev/null
	@echo "removed kvmsnap; $(CONFIG_DIR) was kept. systemctl disable kvmsnap-backup.timer if it was enabled."
