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
# Offline nodes: the CORE bundle and the chat data for every run that names none (the scheduled
# nightly run included). Defaults to ../shared/data beside the checkout when it is there.
shared="$NANORUN_REPO/../shared/data"
if [ -z "${NANORUN_EVAL_BUNDLE:-}" ] && [ -d "$shared/eval_bundle" ]; then export NANORUN_EVAL_BUNDLE="$shared/eval_bundle"; fi
if [ -z "${NANORUN_CHAT_DATA:-}" ] && [ -d "$shared/chat" ]; then export NANORUN_CHAT_DATA="$shared/chat"; fi
export PATH="$NANORUN_VENV/bin:$PATH"
