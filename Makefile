# otelbpf build and run. Everything a fresh Debian/Ubuntu machine needs is
# installed by `setup`; `run` and `test` depend on it, so either works first.
SHELL := /bin/bash
PYTHON_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Optional dependency groups the venv gets (`make install` leaves the test ones out).
EXTRAS ?= test
CLANG ?= clang
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
BPF_CFLAGS := -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -Ibpf
BPF_SRCS := $(wildcard bpf/*.bpf.c) $(wildcard bench/bpf/*.bpf.c) $(wildcard tests/bpf/*.bpf.c)
# Builds of a probe's object for older kernels (the probe's bpf_variants
# chooses at load time): http without the bpf_rdonly_cast kfunc (< 6.2), and
# also without bpf_loop (< 5.17).
BPF_VARIANTS := bpf/http.nocast.bpf.o bpf/http.noloop.bpf.o
BPF_OBJS := $(BPF_SRCS:.bpf.c=.bpf.o) $(BPF_VARIANTS)
# The kernel matrix (tests/test_kernel_matrix.py) boots Debian's kernels
# under qemu: tools/kernel_vm.py.
MATRIX_PACKAGES := qemu-system-x86 busybox-static cpio kmod xz-utils
# nghttp2-client: h2load and nghttp, the HTTP/2 clients of tests/h2_peers.py and bench/h2_overhead.py.
APT_PACKAGES := clang llvm libbpf-dev bpftool python3-bpfcc bpfcc-tools python3-venv gdb \
	libcap2-bin iproute2 make gcc libc6-dev linux-libc-dev linux-perf tshark openssl \
	nginx wrk curl chromium tmux prometheus libssl-dev postgresql nghttp2-client $(MATRIX_PACKAGES)
STAMP_APT := build/.apt-done
STAMP_VENV := build/.venv-done

.PHONY: setup run test bench bpf clean syscall-tables flamegraph-assets pythons

# A terminal gets the live view (`otelbpf top`: the running agent's data, or
# the probes loaded by top itself); a pipe gets the agent with its console exporter.
run: setup
	@if [ -t 0 ] && [ -t 1 ]; then exec $(VENV)/bin/otelbpf top; else exec $(VENV)/bin/otelbpf run; fi

test: setup pythons
	$(PY) -m pytest -ra tests

bench: setup
	$(PY) bench/syscall_overhead.py
	$(PY) bench/agent_cpu.py
	$(PY) bench/profiler_overhead.py
	$(PY) bench/net_overhead.py
	$(PY) bench/http_overhead.py
	$(PY) bench/uprobe_cost.py
	$(PY) bench/h2_overhead.py
	$(PY) bench/h2_decoder.py
	$(PY) bench/request_attribution.py
	$(PY) bench/flood.py

setup: $(STAMP_APT) $(STAMP_VENV) bpf flamegraph-assets

# apt packages: installed once per machine (the stamp lives in the checkout).
$(STAMP_APT):
	@mkdir -p build
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

# The venv sees the system's dist-packages: bcc's Python module comes from
# python3-bpfcc (the PyPI package called "bcc" is an unrelated project).
$(STAMP_VENV): pyproject.toml $(STAMP_APT)
	@mkdir -p build
	test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e $(if $(EXTRAS),'.[$(EXTRAS)]','.')
	@touch $@

bpf: $(BPF_OBJS)

%.bpf.o: %.bpf.c $(wildcard bpf/*.h bpf/l7/*.h) $(STAMP_APT)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

bpf/http.nocast.bpf.o: bpf/http.bpf.c $(wildcard bpf/*.h bpf/l7/*.h) $(STAMP_APT)
	$(CLANG) $(BPF_CFLAGS) -DOTB_NO_RDONLY_CAST -c $< -o $@

bpf/http.noloop.bpf.o: bpf/http.bpf.c $(wildcard bpf/*.h bpf/l7/*.h) $(STAMP_APT)
	$(CLANG) $(BPF_CFLAGS) -DOTB_NO_RDONLY_CAST -DOTB_NO_BPF_LOOP -c $< -o $@

# The renderer `otelbpf profile` inlines into its HTML flame graph: d3 and
# d3-flame-graph at the versions (and integrity hashes) pinned in
# tools/flamegraph-vendor/package-lock.json, copied next to the page template.
# npm is only needed here, at build time; nodesource's nodejs ships its own npm.
FLAME_VENDOR := collector/export/flamegraph_assets/vendor
FLAME_NPM := tools/flamegraph-vendor
flamegraph-assets: $(FLAME_VENDOR)/.done

$(FLAME_VENDOR)/.done: $(FLAME_NPM)/package-lock.json
	command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; }
	cd $(FLAME_NPM) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	mkdir -p $(FLAME_VENDOR)
	cp $(FLAME_NPM)/node_modules/d3/dist/d3.min.js $(FLAME_VENDOR)/d3.min.js
	cp $(FLAME_NPM)/node_modules/d3/LICENSE $(FLAME_VENDOR)/LICENSE.d3
	cp $(FLAME_NPM)/node_modules/d3-flame-graph/dist/d3-flamegraph.umd.min.js $(FLAME_VENDOR)/d3-flamegraph.min.js
	cp $(FLAME_NPM)/node_modules/d3-flame-graph/LICENSE $(FLAME_VENDOR)/LICENSE.d3-flame-graph
	@touch $@

# CPython 3.9 and 3.13 from other Debian releases, unpacked under
# build/pythons for tests/test_python_frames.py (3.11 is the system's);
# `make test` needs them, an install (setup) does not.
pythons: $(STAMP_APT)
	$(PYTHON_SYS) tools/other_pythons.py

# Regenerate the syscall name tables from linux-libc-dev's headers.
syscall-tables:
	$(PYTHON_SYS) tools/gen_syscall_tables.py > probes/syscall_tables.py

clean:
	rm -f $(BPF_OBJS)
	rm -rf build $(FLAME_VENDOR) $(FLAME_NPM)/node_modules

# Install as a systemd service: the checkout's files are copied to $(PREFIX)
# and set up there (runtime dependencies only); the config goes to
# $(CONFIG_DIR) (kept if present); the unit names both. `make uninstall`
# removes all of it but the config and /var/lib/otelbpf.
PREFIX ?= /opt/otelbpf
UNIT_DIR ?= /etc/systemd/system
CONFIG_DIR ?= /etc/otelbpf
SYSTEMCTL ?= systemctl

.PHONY: install uninstall
install:
	mkdir -p $(PREFIX) $(CONFIG_DIR)
	git ls-files -z | xargs -0 -I{} cp --parents {} $(PREFIX)/
	$(MAKE) -C $(PREFIX) setup EXTRAS=
	test -e $(CONFIG_DIR)/otelbpf.yaml || install -m 0644 config/otelbpf.yaml $(CONFIG_DIR)/otelbpf.yaml
	mkdir -p $(UNIT_DIR)
	sed -e 's|/opt/otelbpf|$(PREFIX)|g' -e 's|/etc/otelbpf/otelbpf.yaml|$(CONFIG_DIR)/otelbpf.yaml|g' \
		deploy/systemd/otelbpf.service > $(UNIT_DIR)/otelbpf.service
	chmod 0644 $(UNIT_DIR)/otelbpf.service
	-$(SYSTEMCTL) daemon-reload
	@echo "installed: systemctl enable --now otelbpf"

uninstall:
	-$(SYSTEMCTL) disable --now otelbpf
	rm -f $(UNIT_DIR)/otelbpf.service
	-$(SYSTEMCTL) daemon-reload
	rm -rf $(PREFIX)
