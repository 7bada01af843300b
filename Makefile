# aiMindServe: `make run` runs the product, `make test` runs every test. Both start with `make setup`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.sha256
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup venv backend migrate messages browser lint test-postgres clean

run: setup
	@$(PY) manage.py up

test: setup browser
	$(PY) -m pytest

setup: venv backend migrate messages

venv: $(STAMP)
	@echo "[1/4] Python packages: ready"

# Each step of `make setup` says what it is doing: the first run installs packages and builds llama.cpp (minutes);
# later runs find them done and say so in a line each.
$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aiMindServe needs Python 3.11 or newer")'
	@echo "[1/4] Python packages: installing requirements.txt into $(VENV)/ (a minute or more the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt 2>&1; \
		echo "pip-exit $$?"; } | tee $(VENV)/pip-install.log | awk '\
		/^Collecting /          { n++; if (n % 10 == 0) { printf "      %d packages fetched\n", n; fflush() } } \
		/^Installing collected/ { printf "      installing %d packages\n", n; fflush() } \
		/^ERROR|^error/          { print; fflush() } \
		/^pip-exit /            { if ($$2 != 0) print "      pip failed: its whole output is in $(VENV)/pip-install.log"; \
		                          exit $$2 }'
	@sha256sum requirements.txt > $(STAMP)

backend: venv
	@echo "[2/4] llama.cpp server (llama-box): built once, with its progress in percent (minutes the first time)"
	@$(PY) manage.py install_backend llama-box

migrate: venv
	@echo "[3/4] database: migrating, and the first admin user"
	@$(PY) manage.py migrate --noinput --verbosity 0
	@$(PY) manage.py bootstrap_admin

# The pages' Simplified Chinese (locale/zh_Hans): compiled from the .po kept in the repo.
messages: venv
	@echo "[4/4] page translations: compiling"
	@command -v msgfmt >/dev/null || { echo "installing GNU gettext (msgfmt) for the pages' translations"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq gettext; }
	@$(PY) manage.py compilemessages --ignore=.venv --ignore=data --verbosity 0

# The browser tests drive Debian's chromium (Playwright's own browser download is unreachable here).
# A CJK font too, so the Chinese pages' screenshots show characters, not boxes.
browser:
	@command -v chromium >/dev/null && fc-list :lang=zh | grep -q . || { echo "installing Debian's chromium and a CJK font for the browser tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-wqy-microhei; }

lint: venv
	$(VENV)/bin/ruff check .

# The whole suite (end-to-end included) against PostgreSQL: AIMIND_TEST_DATABASE_URL names the server
# (default: the local one, trust auth). pytest-django creates and drops test_<name> (--create-db: never
# reused, even with --reuse-db in PYTEST_ADDOPTS); each end-to-end system gets its own aimind_e2e_* database.
test-postgres: setup browser
	AIMIND_TEST_DATABASE_URL=$${AIMIND_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} \
		$(PY) -m pytest --create-db

clean:
	rm -rf $(VENV) .pytest_cache
