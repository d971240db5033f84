# incept — build and test.  `make` builds ./incept; `make test` runs the whole suite;
# `make test SAN=1` does the same under AddressSanitizer + UBSan (objects in build-san/).
CC      ?= cc
SAN     ?= 0
OPT     ?= -O3
CFLAGS  ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra $(OPT) -g -pthread -I. -Isrc -I/usr/include/stb
LDLIBS  += -lm -lz -lpthread
ifeq ($(SAN),1)
  BUILD := build-san
  CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDFLAGS += -fsanitize=address,undefined
  BIN := $(BUILD)/incept
else
  BUILD := build
  # ./incept for the default build; another BUILD=DIR (e.g. a clang build) keeps its binary
  # in DIR instead of replacing ./incept
  BIN := $(if $(filter build,$(BUILD)),incept,$(BUILD)/incept)
endif

LIB_SRC  := $(sort $(wildcard src/*/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o)
TEST_SRC := $(sort $(wildcard tests/*.c))
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
PY       := /usr/bin/python3

.PHONY: all test clean deps run bench
all: $(BIN) $(TEST_BIN)

$(BUILD)/%.o: %.c $(wildcard src/*/*.h cli/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libincept.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

CLI_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(sort $(wildcard cli/*.c)))

$(BIN): $(CLI_OBJ) $(BUILD)/libincept.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libincept.a $(wildcard src/*/*.h tests/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libincept.a -o $@ $(LDLIBS)

# Debian packages the build and the tests need; installed when missing (root), else named.
DEBS := python3-torch python3-torchvision python3-numpy python3-pil zlib1g-dev libstb-dev \
        dataset-fashion-mnist
deps:
	@tools/ensure-debs.sh $(DEBS)

test: deps all
	INCEPT_BIN=$(abspath $(BIN)) INCEPT_BUILD=$(abspath $(BUILD)) $(PY) tests/run.py

clean:
	rm -rf build build-san incept

# The README's main command: GoogLeNet on Fashion-MNIST with the default recipe into
# runs/googlenet-fashion-mnist-<timestamp>/ (metrics.csv, curves.png, checkpoints, ...).
# RUN_ARGS adds train options, e.g. RUN_ARGS="--epochs 20", or RUN_ARGS="--resume runs/DIR"
# to continue an interrupted run.
run: deps $(BIN)
	./$(BIN) train googlenet --data fashion-mnist $(RUN_ARGS)

# Side-by-side timing against PyTorch, onnxruntime, OpenVINO and ncnn (minutes; never part of
# `make test`). Installs the peers from PyPI into $(BUILD)/bench-venv on first use.
# BENCH_ARGS passes options through, e.g. BENCH_ARGS="--threads 1 --only gn-b1".
bench: deps $(BIN)
	$(PY) bench/compare.py --incept $(abspath $(BIN)) --build $(abspath $(BUILD)) $(BENCH_ARGS)
