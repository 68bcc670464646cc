# Shared environment for the deploy scripts (sourced). Override any of these before calling them.
NANORUN_REPO=${NANORUN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export NANORUN_REPO
export NANORUN_VENV=${NANORUN_VENV:-$NANORUN_REPO/.venv}
export NANORUN_HOME=${NANORUN_HOME:-$HOME/.cache/nanorun}
export PREFECT_HOME=${PREFECT_HOME:-$NANORUN_HOME/prefect}
mkdir -p "$PREFECT_HOME"   # Prefect creates only the last level of its home
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOST=${PREFECT_HOST:-127.0.0.1}        # loopback unless told otherwise
export PREFECT_PORT=${PREFECT_PORT:-4200}
export PREFECT_API_URL=${PREFECT_API_URL:-http://$PREFECT_HOST:$PREFECT_PORT/api}
export NANORUN_POOL=${NANORUN_POOL:-nanorun-local}
export PATH="$NANORUN_VENV/bin:$PATH"
# Where the data lives (the CORE bundle and chat data for every run that names none, the scheduled
# nightly run included) is the checkout's nanorun.toml, which the CLI reads too: written once, naming
# ../shared/data beside the checkout when it is there; an existing file is kept, and none is written
# when NANORUN_CONFIG names the settings file (docs/settings.md).
if [ -z "${NANORUN_CONFIG:-}" ]; then (cd "$NANORUN_REPO" && "$NANORUN_VENV/bin/nanorun" -q config --init >/dev/null); fi
