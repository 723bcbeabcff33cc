#!/usr/bin/env bash
# The gateway image's entrypoint (/usr/local/bin/keyward-envoy): Envoy with a graceful drain.
# Envoy exits at once on SIGTERM, cutting requests in flight (an LLM call of a minute, a payment).
# This wrapper runs Envoy, and on SIGTERM (ECS stopping the task, Kubernetes deleting the pod):
#   1. asks Envoy to drain (POST /drain_listeners?graceful on the admin port): it keeps serving
#      what is in flight, closes idle and finished connections (HTTP/1.1 `connection: close`,
#      HTTP/2 GOAWAY) and, after --drain-time-s, stops accepting;
#   2. waits up to DRAIN_S seconds (default 30) for in-flight requests;
#   3. asks the filter (POST /keyward/drain on LEDGER_DRAIN, default 127.0.0.1:10000) to give the
#      fleet ledger back what this gateway's slices did not use, until it holds none (each call
#      answers once the returns it asked for are answered or timed out; at most GIVE_BACK_S
#      seconds in all, default 10; a gateway without a ledger answers at once), then stops Envoy.
# The orchestrator's own limit must be longer: ECS stopTimeout, Kubernetes
# terminationGracePeriodSeconds (both 45 in the shipped manifests).
# Arguments are Envoy's. ADMIN (default 127.0.0.1:9901) is the admin address; LEDGER_DRAIN the
# listener with the /keyward/drain route (empty: skip step 3).
#
# The filter configuration at run time (envoy/aws-gateway.yaml): with KEYWARD_CONFIG_SOURCE set
# (ssm:NAME, env:VAR or file:PATH), `keyward config-sync` writes it to KEYWARD_RUN_DIR (default
# /run/keyward) before Envoy starts (a configuration that does not compile stops the start, with
# its error), then checks the source every KEYWARD_CONFIG_EVERY seconds (default 30) and rewrites
# the file Envoy watches when it changed. A bootstrap that names __AWS_REGION__ is written there
# too, with the task's region (AWS_REGION) in its place.
#
# The executor (KEYWARD_EXECUTOR): `wasm` (default) runs the filter as the configurations describe
# it (keyward.wasm in Envoy's V8); `native` runs the same configuration in the native module
# (/usr/local/lib/keyward/libkeyward.so, Envoy's dynamic-modules filter): `keyward native-config`
# rewrites the bootstrap (and the ECDS template config-sync fills) into KEYWARD_RUN_DIR first.
set -u
DRAIN_S="${DRAIN_S:-30}"
ADMIN="${ADMIN:-127.0.0.1:9901}"
ENVOY="${ENVOY:-envoy}"
KEYWARD="${KEYWARD:-keyward}"
LEDGER_DRAIN="${LEDGER_DRAIN-127.0.0.1:10000}"
RUN_DIR="${KEYWARD_RUN_DIR:-/run/keyward}"
TEMPLATE="${KEYWARD_FILTER_TEMPLATE:-/etc/envoy/keyward-filter.template.json}"
EXECUTOR="${KEYWARD_EXECUTOR:-wasm}"
sync_pid=""

case "$EXECUTOR" in
  wasm) ;;
  native)
    export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="${ENVOY_DYNAMIC_MODULES_SEARCH_PATH:-/usr/local/lib/keyward}"
    if [ ! -f "$ENVOY_DYNAMIC_MODULES_SEARCH_PATH/libkeyward.so" ]; then
      echo "keyward-envoy: KEYWARD_EXECUTOR=native needs $ENVOY_DYNAMIC_MODULES_SEARCH_PATH/libkeyward.so" >&2; exit 78
    fi ;;
  *) echo "keyward-envoy: KEYWARD_EXECUTOR must be wasm or native; got '$EXECUTOR'" >&2; exit 64 ;;
esac

args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in -c|--config-path) ;; *) continue ;; esac
  j=$((i + 1))
  boot="${args[$j]:-}"
  if [ -n "$boot" ] && grep -q '__AWS_REGION__' "$boot" 2>/dev/null; then
    case "${AWS_REGION:-}" in
      ''|*[!a-z0-9-]*) echo "keyward-envoy: $boot needs AWS_REGION (e.g. us-east-1); got '${AWS_REGION:-}'" >&2; exit 64 ;;
    esac
    mkdir -p "$RUN_DIR" || exit 73
    sed "s/__AWS_REGION__/$AWS_REGION/g" "$boot" > "$RUN_DIR/envoy.yaml" || exit 73
    args[$j]="$RUN_DIR/envoy.yaml"
    boot="$RUN_DIR/envoy.yaml"
  fi
  if [ "$EXECUTOR" = native ] && [ -n "$boot" ]; then
    mkdir -p "$RUN_DIR" || exit 73
    "$KEYWARD" native-config "$boot" --out "$RUN_DIR/envoy.native.yaml" || { echo "keyward-envoy: cannot run $boot natively" >&2; exit 78; }
    args[$j]="$RUN_DIR/envoy.native.yaml"
  fi
done

if [ "$EXECUTOR" = native ]; then
  for a in "${args[@]}"; do
    if [ "$a" = "--config-yaml" ]; then
      echo "keyward-envoy: KEYWARD_EXECUTOR=native rewrites configuration files (-c); --config-yaml is not rewritten" >&2; exit 64
    fi
  done
fi

if [ "$EXECUTOR" = native ] && [ -f "$TEMPLATE" ]; then
  mkdir -p "$RUN_DIR" || exit 73
  "$KEYWARD" native-config "$TEMPLATE" --out "$RUN_DIR/keyward-filter.template.native.json" || exit 78
  TEMPLATE="$RUN_DIR/keyward-filter.template.native.json"
fi

if [ -n "${KEYWARD_CONFIG_SOURCE:-}" ]; then
  EVERY="${KEYWARD_CONFIG_EVERY:-30}"
  case "$EVERY" in
    ''|*[!0-9]*) echo "keyward-envoy: KEYWARD_CONFIG_EVERY must be 1-86400 seconds; got '$EVERY'" >&2; exit 64 ;;
  esac
  if [ "$EVERY" -lt 1 ] || [ "$EVERY" -gt 86400 ]; then
    echo "keyward-envoy: KEYWARD_CONFIG_EVERY must be 1-86400 seconds; got '$EVERY'" >&2; exit 64
  fi
  mkdir -p "$RUN_DIR" || exit 73
  sync=("$KEYWARD" config-sync --source "$KEYWARD_CONFIG_SOURCE" --template "$TEMPLATE" --out "$RUN_DIR/keyward-filter.json")
  # The first configuration must be good: Envoy would otherwise start without its filter.
  "${sync[@]}" || { echo "keyward-envoy: no usable filter configuration from $KEYWARD_CONFIG_SOURCE; not starting" >&2; exit 78; }
  # Kept in step for as long as Envoy runs: a sync loop that stops is started again.
  (
    trap 'kill -TERM "$child" 2>/dev/null; exit 0' TERM
    while :; do
      "${sync[@]}" --every "$EVERY" & child=$!
      wait "$child"
      echo "keyward-envoy: config-sync stopped (status $?); starting it again in 5 s" >&2
      sleep 5
    done
  ) &
  sync_pid=$!
fi

"$ENVOY" --drain-time-s "$DRAIN_S" --drain-strategy immediate "${args[@]}" &
pid=$!

admin_post() { # path: a POST to Envoy's admin with bash's /dev/tcp (no curl in the image)
  local host="${ADMIN%:*}" port="${ADMIN##*:}"
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$ADMIN" >&3
  head -1 <&3
  exec 3<&-
}

drain() {
  trap - TERM INT
  echo "keyward-envoy: draining for up to ${DRAIN_S}s" >&2
  admin_post "/drain_listeners?graceful" >&2 || echo "keyward-envoy: the admin did not answer; stopping" >&2
  # In flight: Envoy's downstream_rq_active gauge, summed over listeners, until it reaches 0.
  deadline=$((SECONDS + DRAIN_S))
  while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$pid" 2>/dev/null; do
    active="$(admin_get_active)"
    [ "$active" = "0" ] && break
    sleep 0.5
  done
  give_back
  [ -z "$sync_pid" ] || kill -TERM "$sync_pid" 2>/dev/null
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"
  exit 0
}

# The fleet ledger's slices go back (`{"returning":n,"held":m}`): asked again until none is held.
give_back() {
  [ -n "$LEDGER_DRAIN" ] || return 0
  local host="${LEDGER_DRAIN%:*}" port="${LEDGER_DRAIN##*:}" body rc i until=$((SECONDS + ${GIVE_BACK_S:-10}))
  for i in $(seq 1 25); do
    [ "$SECONDS" -lt "$until" ] || break
    # (`exec` with `2>/dev/null` would silence the script for good: the group scopes it.)
    { exec 5<>"/dev/tcp/$host/$port"; } 2>/dev/null || { echo "keyward-envoy: $LEDGER_DRAIN refused the drain call" >&2; return 0; }
    printf 'POST /keyward/drain HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$LEDGER_DRAIN" >&5
    # Read to the end of the answer, within what is left of the budget.
    body="" rc=0
    IFS= read -r -d '' -t "$(( until - SECONDS > 1 ? until - SECONDS : 1 ))" body <&5 || rc=$?
    exec 5<&-
    [ "$rc" -gt 128 ] && break # the budget ran out while the filter waited for the ledger
    case "$body" in
      *'"held":0'*) echo "keyward-envoy: the ledger slices are given back" >&2; return 0 ;;
      *'"held":'*) sleep 0.2 ;;
      *) # no drain route (or the filter did not run): nothing to give back
        echo "keyward-envoy: the drain route answered ${body%%$'\r'*}; nothing given back" >&2
        return 0 ;;
    esac
  done
  echo "keyward-envoy: some ledger slices are still held; they stay counted as spent" >&2
}

admin_get_active() {
  local host="${ADMIN%:*}" port="${ADMIN##*:}" n=0 line v seen=0
  # Unreachable admin or an unexpected answer: report 1 (keep draining until DRAIN_S), never 0.
  exec 4<>"/dev/tcp/$host/$port" || { echo 1; return; }
  printf 'GET /stats?filter=downstream_rq_active$ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$ADMIN" >&4
  while IFS= read -r line <&4; do
    line="${line%$'\r'}"
    case "$line" in
      http.admin.downstream_rq_active:*) seen=1 ;;
      *downstream_rq_active:*)
        v="${line##*: }"
        case "$v" in ''|*[!0-9]*) ;; *) n=$((n + v)); seen=1 ;; esac ;;
    esac
  done
  [ "$seen" = 1 ] || n=1
  exec 4<&-
  echo "$n"
}

trap drain TERM INT
wait "$pid"
status=$?
# Envoy exited by itself (bad config, crash): its status is ours.
if ! kill -0 "$pid" 2>/dev/null; then
  [ -z "$sync_pid" ] || kill -TERM "$sync_pid" 2>/dev/null
  exit "$status"
fi
# `wait` was interrupted by the trap; drain() exits.
wait "$pid"
