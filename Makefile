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
# libvirt (its daemon for the tests, its headers for libvirt-python), and borgbackup's build
# dependencies.
APT_PACKAGES := python3 python3-venv python3-dev build-essential \
	qemu-system-x86 qemu-system-common qemu-utils \
	e2fsprogs xfsprogs cpio kmod busybox-static util-linux fdisk debootstrap \
	restic fuse3 libnbd-bin libvirt-daemon-system libvirt-clients libvirt-dev \
	liblz4-dev libzstd-dev libxxhash-dev libacl1-dev libssl-dev pkg-config \
	dosfstools lvm2
# libguestfs (files mode's route for LVM, LUKS, vfat, NTFS the host kernel cannot mount):
# installed without Recommends (they pull a desktop's worth of tools); the appliance's
# kernel is only a Recommends, so it is named here; ntfs-3g and btrfs-progs give the NTFS and
# btrfs verdicts (ntfsinfo, btrfs inspect-internal).
APT_PACKAGES_NO_RECOMMENDS := libguestfs-tools python3-guestfs linux-image-amd64 \
	ntfs-3g btrfs-progs

.PHONY: help deps venv guest qemu10 demo test lint bench clean

help:
	@echo "make demo   - back up the running demo guest (sets everything up first)"
	@echo "make test   - run the test suite with real QEMU, borg, restic, borgmatic"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (results in bench/out)"
	@echo "make qemu10 - QEMU 10 from bookworm-backports in ~/.cache/kvmsnap/qemu-10 (not installed)"
	@echo "make clean  - remove the venv (the demo guest cache stays in ~/.cache/kvmsnap)"

# Each list: install what is missing (nothing when all are there), the second one without
# Recommends.
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
	$(BIN)/pytest -q

bench: guest qemu10
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
