#!/usr/bin/env bash
# Sets up a test environment from nothing and runs the whole test suite, slow tests included:
# a venv (.venv-test), the CPU build of torch pinned, every other dependency pinned by requirements-test.txt,
# then ruff and pytest (the install tests build the wheel and install it as a user does).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` for the quick suite).
# The install step is skipped when the venv was set up from these same pins and this same pyproject.toml.
# Tests run on one pytest-xdist worker per core (CROSSINIT_TEST_WORKERS=0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CROSSINIT_TEST_VENV:-.venv-test}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.crossinit-setup"
wanted="$(cat pyproject.toml requirements-test.txt scripts/test.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$py" -m pip install --quiet --disable-pip-version-check -c requirements-test.txt -e ".[test]"
    echo "$wanted" >"$stamp"
else
    echo "test environment $venv is current (delete $stamp to reinstall)"
fi
export HF_HUB_OFFLINE=1
"$py" -m ruff check .
"$py" -m ruff format --check .
exec "$py" -m pytest -m "" -n "${CROSSINIT_TEST_WORKERS:-logical}" --durations=15 "$@"
