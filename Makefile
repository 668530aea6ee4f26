# vmexportfs — build, test, demo, benchmark, fuzz.
export PATH := /usr/local/go/bin:$(PATH)

GO        ?= go
BIN       ?= bin/vmexportfs
MNT       ?= /mnt/vms
PLATFORM  ?= coriolis
FUZZTIME  ?= 30s
MAN       ?= bin/vmexportfs.1

.PHONY: build test demo bench bench-scale fuzz vet clean man

# -buildvcs=auto: the commit in `vmexportfs --version` from a checkout, even
# where GOFLAGS turns it off; nothing from a tree without git.
build:
	$(GO) build -buildvcs=auto -o $(BIN) ./cmd/vmexportfs

# The man page, generated from the command's own flag definitions
# (man -l $(MAN) shows it).
man: build
	$(BIN) man > $(MAN).tmp && mv $(MAN).tmp $(MAN)

vet:
	$(GO) vet ./...

# The tests mount real FUSE filesystems: run as root with /dev/fuse present.
# A test that lacks root or a tool fails, and so does the run if any test
# skipped (scripts/testreport); VMEXPORTFS_ALLOW_SKIP=1 lets them skip.
test: vet
	$(GO) run ./scripts/testreport -go $(GO) -- -count=1 -timeout 20m ./...

# Mounts a built-in simulator with sample VMs on $(MNT): Coriolis, or
# PLATFORM=kubevirt (vmexportfs demo --help lists them).
demo: build
	mkdir -p $(MNT)
	$(BIN) demo --platform $(PLATFORM) $(MNT)

bench: build
	scripts/bench.sh

# The scale rows (1 TiB disk, 64 readers, 100,000 VMs): about 10 minutes.
bench-scale: build
	scripts/bench-scale.sh

# Runs every fuzz target for $(FUZZTIME). Minimizing a new input is capped
# at 200 runs: with inputs of kilobytes (whole image headers and tables) Go's
# minimizer, quadratic in the input's length, would take the whole time.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
		for target in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "== $$pkg $$target"; \
			$(GO) test -run '^$$' -fuzz "^$$target$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 200x $$pkg; \
		done; \
	done

clean:
	rm -rf bin
