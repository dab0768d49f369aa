# nginx-authentik: build, package, test.
#   make module            module for Debian's nginx 1.22.1 -> build/ngx_http_authentik_module.so
#   make module-vendored   nginx 1.28 + module             -> build/vendored/{sbin/nginx,ngx_http_authentik_module.so}
#   make test              every test (lint, unit, end-to-end on both targets, package)
#   make demo              nginx + module + local identity provider + sample app
#                          (AUTHENTIK=emulator: nginx as the outpost of the authentik emulator)
SHELL := /bin/bash
BUILD := $(CURDIR)/build
CARGO ?= cargo
PROFILE ?= release
MODULE_SO := libngx_http_authentik_module.so
RUST_SOURCES := $(shell find src core/src -name '*.rs') Cargo.toml core/Cargo.toml build.rs Cargo.lock

# Copy to a temporary name, then rename: a running nginx has the old file mapped, and writing
# over it in place would crash that nginx (SIGBUS).
INSTALL_ATOMIC = install_atomic() { cp "$$1" "$$2.tmp.$$$$" && mv -f "$$2.tmp.$$$$" "$$2"; }; install_atomic

DEBIAN_SRC := /usr/share/nginx/src
DEBIAN_OBJS := $(BUILD)/nginx-objs
DEBIAN_TARGET := $(BUILD)/target-debian
VENDORED_TARGET := $(BUILD)/target-vendored

.PHONY: all module module-vendored deps check unittest e2e test demo deb docker-image bench bench-module bench-smoke clean

all: module module-vendored

deps:
	@.ci/deps.sh

# --- Debian's nginx 1.22.1 -------------------------------------------------------------
$(DEBIAN_OBJS)/Makefile: | $(DEBIAN_SRC)/conf_flags
	@mkdir -p $(DEBIAN_OBJS)
	cd $(DEBIAN_SRC) && . ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" --builddir=$(DEBIAN_OBJS) > $(DEBIAN_OBJS)/configure.log

$(DEBIAN_SRC)/conf_flags:
	@.ci/deps.sh build

$(BUILD)/ngx_http_authentik_module.so: $(DEBIAN_OBJS)/Makefile $(RUST_SOURCES)
	NGINX_SOURCE_DIR=$(DEBIAN_SRC) NGINX_BUILD_DIR=$(DEBIAN_OBJS) CARGO_TARGET_DIR=$(DEBIAN_TARGET) \
		$(CARGO) build --locked --profile $(PROFILE) -p nginx-authentik
	$(INSTALL_ATOMIC) $(DEBIAN_TARGET)/$(PROFILE)/$(MODULE_SO) $@

module: $(BUILD)/ngx_http_authentik_module.so

# --- vendored nginx 1.28 ---------------------------------------------------------------
$(BUILD)/vendored/ngx_http_authentik_module.so: $(RUST_SOURCES) | $(DEBIAN_SRC)/conf_flags
	CARGO_TARGET_DIR=$(VENDORED_TARGET) $(CARGO) build --locked --profile $(PROFILE) -p nginx-authentik --features vendored
	@mkdir -p $(BUILD)/vendored/sbin
	$(INSTALL_ATOMIC) $(VENDORED_TARGET)/$(PROFILE)/$(MODULE_SO) $@
	$(INSTALL_ATOMIC) "$$(ls -t $(VENDORED_TARGET)/$(PROFILE)/build/nginx-sys-*/out/objs/nginx | head -n1)" $(BUILD)/vendored/sbin/nginx

module-vendored: $(BUILD)/vendored/ngx_http_authentik_module.so

# --- checks and tests ------------------------------------------------------------------
check: $(DEBIAN_OBJS)/Makefile
	@.ci/deps.sh build
	$(CARGO) fmt --all -- --check
	NGINX_SOURCE_DIR=$(DEBIAN_SRC) NGINX_BUILD_DIR=$(DEBIAN_OBJS) CARGO_TARGET_DIR=$(DEBIAN_TARGET) \
		$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

unittest:
	@.ci/deps.sh build
	CARGO_TARGET_DIR=$(DEBIAN_TARGET) $(CARGO) test --locked --profile $(PROFILE) -p authentik-core

e2e: module module-vendored deb docker-image
	@.ci/deps.sh test
	$(BUILD)/venv/bin/python -m pytest -n 2 t/

# `make test` is the README's test command; .ci/run calls it (with -k).
TEST_STAGES := check unittest e2e bench-smoke fuzz-smoke
test: $(TEST_STAGES)

deb: module
	packaging/build-deb.sh $(BUILD)/ngx_http_authentik_module.so $(BUILD)

# Docker is not run here: stage what Dockerfile.build's second stage copies, from the vendored
# build (nginx 1.28.3 --with-compat, as in the official image); t/test_docker_stage.py checks it.
docker-image: module-vendored
	packaging/docker-stage.sh --module $(BUILD)/vendored/ngx_http_authentik_module.so $(BUILD)/docker

demo: module
	@.ci/deps.sh test
	@$(BUILD)/venv/bin/python t/demo.py $(if $(AUTHENTIK),--authentik $(AUTHENTIK))

# The bench uses its own build with the BENCH-ONLY fill endpoint (cargo feature `bench`);
# that .so is never packaged.
# The same target directory as `module`: the dependency graph is compiled once (only this
# crate is rebuilt with the feature). So are the core unit tests (`unittest`, same profile).
BENCH_TARGET := $(DEBIAN_TARGET)

$(BUILD)/bench/ngx_http_authentik_module.so: $(DEBIAN_OBJS)/Makefile $(RUST_SOURCES)
	@mkdir -p $(BUILD)/bench
	NGINX_SOURCE_DIR=$(DEBIAN_SRC) NGINX_BUILD_DIR=$(DEBIAN_OBJS) CARGO_TARGET_DIR=$(BENCH_TARGET) \
		$(CARGO) build --locked --profile $(PROFILE) -p nginx-authentik --features bench
	$(INSTALL_ATOMIC) $(BENCH_TARGET)/$(PROFILE)/$(MODULE_SO) $@

bench-module: $(BUILD)/bench/ngx_http_authentik_module.so

bench: module bench-module
	bench/run.sh

# Part of `make test`: kept to `module` so the stage stays short; the smoke run uses the bench
# build for its scale part only if one was built before (make bench-module).
bench-smoke: module
	BENCH_SMOKE=1 bench/run.sh

# Coverage-guided fuzzing of authentik-core (libFuzzer, stable toolchain; fuzz/run.sh,
# build/target-fuzz). `make fuzz` runs each target FUZZ_SECONDS (default 300); `fuzz-smoke`
# (part of `make test`) builds them and runs each a few seconds from the committed corpus.
.PHONY: fuzz fuzz-smoke
FUZZ_SECONDS ?= 300
fuzz:
	@.ci/deps.sh build
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh fuzz

fuzz-smoke:
	@.ci/deps.sh build
	fuzz/run.sh smoke

print-%:
	@echo $($*)

clean:
	rm -rf $(BUILD)
