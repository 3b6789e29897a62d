# events-bridge: two commands do all the set-up on a fresh machine.
#   make run    venv + dependencies, a RabbitMQ broker, dev keys, then serve on 127.0.0.1:8080
#   make test   the same set-up, then the whole test suite against the real broker
#   make check  ruff + mypy (strict) + the tests with coverage: the quality gate, as in CI
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCAL := .local
DEV_KEYS := $(LOCAL)/keys
DEV_KEY := $(DEV_KEYS)/private/pub-key-dev.key.pem
DEV_CLIENT_ID := events-bridge-dev
SAMPLE := tests/data/adobe-samples/events/imaging_lightroom-job-status_succeeded.json
PYTEST_ARGS ?=
# RABBITMQ=4: the broker targets and the suites use a private RabbitMQ 4.0 instead (a podman
# container on 127.0.0.1:5682, `deploy/broker.sh ensure --version 4`); empty or 3: the default.
RABBITMQ ?=
ifneq ($(filter-out 3 3.% 4 4.%,$(RABBITMQ)),)
$(error RABBITMQ=$(RABBITMQ): 3 (the default) or 4)
endif
ifneq ($(filter 4 4.%,$(RABBITMQ)),)
BROKER_VERSION := --version 4
AMQP_URL_FILE := $(LOCAL)/amqp-url-4
# The tests control this node (restarts, alarms) through podman: tests/broker_node.py.
export BRIDGE_TEST_RABBITMQ := 4
else
BROKER_VERSION :=
AMQP_URL_FILE := $(LOCAL)/amqp-url
endif
AMQP_URL := $$(cat $(AMQP_URL_FILE))
# The pure core (no I/O: Adobe's formats, the rules, messages, config) and its coverage floor.
CORE := bridge/adobe/*,bridge/authorize.py,bridge/config*.py,bridge/dedup.py,bridge/errors.py,$\
	bridge/frames.py,bridge/message.py,bridge/routing.py,bridge/rules.py,bridge/topology.py,$\
	bridge/yamldoc.py
CORE_FLOOR ?= 95
# Their own tests, in-process: tracing the daemon suites would distort their timing asserts.
CORE_TESTS := tests/test_envelope.py tests/test_signature.py tests/test_signature_vectors.py \
	tests/test_jobstatus.py tests/test_intake_bad_input.py tests/test_routing.py \
	tests/test_config.py tests/test_topology.py tests/test_message.py tests/test_frames.py \
	tests/test_dedup.py tests/test_handshake.py tests/test_authorize.py \
	tests/test_journal_protocol.py tests/test_config_journal.py tests/test_envelope_catalog.py \
	tests/test_tls_broker_config.py tests/test_topology_streams.py tests/test_streams.py

.PHONY: help install tools broker broker-stop run test test-faults test-portable test-faults-portable \
	test-cluster image test-image coverage bench check lint typecheck fmt lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)  ## create .venv and install the project with its pinned dependencies

broker:  ## find or start a RabbitMQ broker (BRIDGE_AMQP_URL, :5672, Docker, a private node; RABBITMQ=4: 4.0)
	@mkdir -p $(LOCAL)
	@deploy/broker.sh ensure $(BROKER_VERSION) > $(AMQP_URL_FILE)

tools:  ## the validators the tests run on deploy/ (docker-compose, systemd-analyze), via apt as root
	@deploy/tools.sh

broker-stop:  ## stop the broker that `make broker` started
	@deploy/broker.sh stop $(BROKER_VERSION)

$(DEV_KEY): | $(STAMP)
	@$(BIN)/events-bridge keys generate $(DEV_KEYS) --name dev >/dev/null
	@echo "generated a development key pair in $(DEV_KEYS)/"

run: install broker $(DEV_KEY)  ## serve on 127.0.0.1:8080 with development settings
	@echo
	@echo "events-bridge is starting on http://127.0.0.1:8080/webhook (Ctrl-C stops it)."
	@echo "In another terminal, watch what it publishes:"
	@echo "  $(BIN)/events-bridge tail"
	@echo "and in a third, send it a signed Lightroom event as Adobe would:"
	@echo "  $(BIN)/events-bridge simulate --url http://127.0.0.1:8080/webhook \\"
	@echo "      --key $(DEV_KEY) --key-path /prod/keys/pub-key-dev.pem \\"
	@echo "      --client-id $(DEV_CLIENT_ID) $(SAMPLE)"
	@echo
	@BRIDGE_AMQP_URL=$(AMQP_URL) \
	BRIDGE_CLIENT_IDS=$(DEV_CLIENT_ID) \
	BRIDGE_KEY_BASE_URL=file://$(CURDIR)/$(DEV_KEYS) \
	exec $(BIN)/events-bridge serve --config config/bridge.yaml

test: install broker tools  ## run the whole test suite against a real broker
	BRIDGE_TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest $(PYTEST_ARGS)

test-faults: install broker  ## the fault suite: broker, network and process faults under load
	BRIDGE_TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest -m faults tests/faults $(PYTEST_ARGS)

# The fast publish path leans on aiormq internals (bridge/channel.py); when they are not what it
# expects, the bridge publishes with aiormq's public basic_publish. These run every suite so.
test-portable: install broker tools  ## the whole test suite on the portable publish path
	BRIDGE_PUBLISH_PATH=portable BRIDGE_TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest $(PYTEST_ARGS)

test-faults-portable: install broker  ## the fault suite on the portable publish path
	BRIDGE_PUBLISH_PATH=portable BRIDGE_TEST_AMQP_URL=$(AMQP_URL) \
		$(BIN)/pytest -m faults tests/faults $(PYTEST_ARGS)

# A 3-node RabbitMQ cluster in podman containers on a network of its own, two bridge replicas
# listing every node, steady load; a node killed, stopped, cut off, and all three restarted.
test-cluster: install  ## the cluster fault suite (tests/cluster): RABBITMQ=3 (3.10, default) or 4
	deploy/container/image.sh test-tools
	deploy/container/image.sh rabbitmq $(if $(filter 4 4.%,$(RABBITMQ)),--version 4,--version 3)
	BRIDGE_CLUSTER_RABBITMQ=$(or $(RABBITMQ),3) $(BIN)/pytest -m cluster tests/cluster $(PYTEST_ARGS)

image:  ## the container image, events-bridge:<version>, saved to .local/image/ (BASE=python:3.11-slim: another base)
	deploy/container/image.sh build $(if $(BASE),--base $(BASE))

# After the other suites in CI: the image run as operators run it (podman), the chart as a
# sidecar Pod under `podman kube play`, the compose file through podman's Docker API.
test-image: install broker image  ## build the image, then run it against the real broker
	deploy/container/image.sh test-tools
	deploy/container/image.sh rabbitmq
	BRIDGE_TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest -m image tests/image $(PYTEST_ARGS)

coverage: install broker  ## the pure core's tests with coverage: it must keep CORE_FLOOR %
	BRIDGE_TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest -q --cov=bridge --cov-report= \
		$(CORE_TESTS)
	$(BIN)/coverage report --include='$(CORE)' --fail-under=$(CORE_FLOOR)

bench: install broker  ## benchmarks (tests/bench): events/s and ratios against aio-pika and a plain handler
	BRIDGE_AMQP_URL=$(AMQP_URL) $(BIN)/python tests/bench/run.py $(BENCH_ARGS)

lint:  ## ruff
	$(BIN)/ruff check bridge tests deploy/examples/python
	$(BIN)/ruff format --check bridge tests deploy/examples/python

typecheck:  ## mypy --strict
	$(BIN)/mypy

check: install lint typecheck test coverage  ## the quality gate: ruff, mypy, the tests, coverage

fmt:  ## format the code
	$(BIN)/ruff format bridge tests
	$(BIN)/ruff check --fix bridge tests

lock: install  ## refresh constraints.txt from the installed environment
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check > constraints.txt

clean:  ## remove the venv and caches (keeps .local/, the broker's data and dev keys)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
