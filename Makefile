# The commands of the README: `make run`, `make test`, and `make install` (the
# binary and a systemd unit for `serve`). `run` and `test` install the system
# packages they need when missing and build the guest image when it is not
# cached. Everything runs as root (VMs, netns, nginx).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

export WEBHOSTER_STATE_DIR ?= /var/lib/webhoster
export WEBHOSTER_IMAGE_CACHE ?= /var/cache/webhoster/images
# /api/v1/version reports the commit the binary was built from.
export WEBHOSTER_GIT_COMMIT ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null)
export WEBHOSTER_TEST_DATABASE_URL ?= postgres://webhoster:webhoster@127.0.0.1:5432/webhoster_test

# Debian packages, by what needs them.
RUN_PKGS := qemu-system-x86 qemu-utils nginx-light mmdebstrap e2fsprogs busybox-static cpio zstd \
	genisoimage nftables iproute2 openssh-client socat ca-certificates openssl
TEST_PKGS := postgresql wrk sshpass jq openssh-server systemd chromium chromium-driver curl python3-venv

# `make install`: the binary goes to $(PREFIX)/bin; DESTDIR stages everything
# under another root (the unit still names the paths as seen from /).
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: run test bench install deps test-deps

run: deps
	cargo build --release
	target/release/webhoster image build > /dev/null
	exec target/release/webhoster serve

test: deps test-deps
	cargo fmt --check
	# Both packages (webhoster and images/agent/): the image build puts
	# webhoster-seed-agent into the guest.
	cargo build --quiet
	cargo run --quiet --bin webhoster -- image build > /dev/null
	cargo clippy --all-targets -- -D warnings
	.ci/postgres-up
	cargo test --no-fail-fast

bench: deps test-deps
	cargo build --release
	target/release/webhoster image build > /dev/null
	.ci/postgres-up
	cargo bench

install:
	cargo build --release
	target/release/webhoster install --prefix $(PREFIX) --root $(or $(DESTDIR),/)

deps:
	@.ci/host-packages $(RUN_PKGS)

test-deps:
	@.ci/host-packages $(TEST_PKGS)
	@.ci/schemathesis > /dev/null
