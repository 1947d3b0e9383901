# Entry points. `make run` serves on embedded defaults; `make test` runs every check and test.
# libunftp is patched before any cargo command (see patches/README.md), so every target starts there.

.PHONY: patch build run test static

patch:
	patches/apply.sh

build: patch
	cargo build --release --locked

# Flags for `make run`, as in: make run ARGS="--listen 127.0.0.1:2121 --passive-ports 50000-50019"
ARGS ?=

run: build
	./target/release/ftpsd $(ARGS)

test: patch
	.ci/test

# A fully static binary for the glibc host target, at
# target/x86_64-unknown-linux-gnu/release/ftpsd. tests/e2e/test_static_rootfs.py runs it from an
# empty root directory, as a stand-in for the musl binary of the Alpine image (no container
# engine runs in CI).
static: patch
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu
