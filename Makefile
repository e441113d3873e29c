# Mailroom: `make run` starts the whole suite, `make test` runs every test but the soaks (`make soak`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
VAR    := ./var
DOMAIN ?= example.org

.PHONY: run test soak lint typecheck peers bench chaos cluster clean venv

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(VAR)/mailroom.toml: | venv
	$(BIN)/mailroom init --dir $(VAR) --domain $(DOMAIN) --hostname localhost

run: venv $(VAR)/mailroom.toml
	$(BIN)/mailroom --config $(VAR)/mailroom.toml run

# Real peers (Postfix, Dovecot, swaks, msmtp, dnsmasq) come from Debian; as root
# they are installed when missing.  Without them the interop tests fail (never skip).
peers:
	@if [ "$$(id -u)" = 0 ]; then ./.ci/install-peers; else echo "not root: not installing peers"; fi

# Every test but the soaks, in $(WORKERS) processes (pytest-xdist: a test file runs
# whole in one of them; each draws its ports from its own share, tests/support/ports.py).
# Three on two cores: most tests wait on real daemons and peers more than they compute,
# and with two workers the cores stood idle for 40% of the run.
WORKERS ?= 3
test: venv peers
	$(BIN)/pytest -n $(WORKERS) --dist loadfile -m "not slow" --durations=25

# The soaks (marked `slow`: chaos, the cluster, ten reloads and a backup under load,
# a thousand deliveries), one at a time: each wants the machine to itself.
soak: venv peers
	$(BIN)/pytest -m slow

# Mailroom and Postfix side by side under the same loads, each load three times
# with the two taking turns (as root: Postfix runs only as root), then the
# listener alone (our engine, a stock aiosmtpd sink and smtp-sink under
# smtp-source).  Prints the median and range of every figure, the machine and the
# commit, writes bench/results/latest.json and ends with
# `e2e_ratio=R one_session_ratio=S p99_ms=L cpu_ms_per_msg=C idle1000_mb=M listener_vs_aiosmtpd=X`.
# BENCH_QUICK=1 make bench: small loads, for development.  See docs/performance.md.
bench: venv peers
	ulimit -n 8192 2>/dev/null || true; $(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check common msa mta mda cli web bench lab tests
	$(BIN)/mypy

# SIGKILL a random daemon every half second while 20 clients submit 2,000 messages,
# on SQLite and then on a throwaway PostgreSQL cluster (as root: PostgreSQL runs as
# its own user); the last line of each is
# `accepted=N delivered=N lost=0 duplicates=0 indoubt_delivered=K/N`.
chaos: venv
	$(BIN)/python -m tests.chaos --messages 2000 --clients 20
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python -m tests.chaos --messages 2000 --clients 20 --postgresql; \
	else echo "not root: skipping the PostgreSQL chaos run"; fi

# Two MX nodes and a mail store on loopback addresses 127.0.0.11-13 sharing one throwaway
# PostgreSQL cluster (as root: PostgreSQL runs as its own user): 20 sessions send 2,000
# messages while one MX host is killed with kill -9 and the other frozen for twice the
# lease; the last line is `accepted=N delivered=N lost=0 duplicates=0 max_delay_s=X`.
# See docs/cluster.md.
cluster: venv
	@if [ "$$(id -u)" != 0 ]; then echo "make cluster: run it as root (PostgreSQL runs as its own user)"; exit 1; fi
	$(BIN)/python -m tests.cluster --messages 2000 --sessions 20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
