# aiportal: `make run` brings up the one-machine dev cluster and the portal; `make test` runs
# the whole suite against it. Both install what is missing (Debian packages, PyPI) first.
SHELL := /bin/bash
VENV := .venv
export ANSIBLE_CONFIG := $(CURDIR)/ansible/ansible.cfg
PLAYBOOK := $(VENV)/bin/ansible-playbook -i ansible/inventories/dev
PYTEST_ARGS ?=

.PHONY: help setup provision run test down clean-state

help:
	@echo "make run    install, provision the dev cluster, start the portal on https://127.0.0.1:8443"
	@echo "make test   the same set-up, then the whole test suite"
	@echo "make down   stop every daemon the dev cluster started (by pid file)"

setup:
	@scripts/bootstrap.sh

provision: setup
	@scripts/timed.sh provision $(PLAYBOOK) ansible/site.yml

run: provision
	@echo
	@echo "portal:      https://127.0.0.1:8443  (admin token: /etc/aiportal/secrets/admin_token)"
	@echo "cluster API: curl -H \"Authorization: Bearer \$$(cat /etc/aiportal/secrets/admin_token)\" https://127.0.0.1:8443/api/v1/cluster"
	@echo "stop:        make down"

test: provision
	@scripts/bootstrap.sh --test-tools
	@scripts/timed.sh pytest $(VENV)/bin/pytest $(PYTEST_ARGS)

down:
	@if [ -x $(VENV)/bin/ansible-playbook ]; then $(PLAYBOOK) ansible/down.yml; else echo "nothing to stop (no .venv)"; fi
