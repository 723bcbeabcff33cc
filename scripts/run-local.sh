#!/usr/bin/env bash
# A complete local Keyward gateway in the foreground, for `make run` and for func-e.
#   OpenBao dev server on 127.0.0.1:8200 (seeded with demo secrets)
#   demo vendor        on 127.0.0.1:8081 (echoes what it received)
#   Envoy + keyward    on 127.0.0.1:10000 (admin on 127.0.0.1:9901)
#
#   scripts/run-local.sh            everything, Envoy included (this is `make run`)
#   scripts/run-local.sh --no-envoy OpenBao and the demo vendor only, plus .run/env with what
#                                   Envoy needs; then, in another terminal, from the repository root:
#                                     . .run/env && func-e run -c envoy/local.yaml
# KEYWARD_EXECUTOR=native runs the native module (dist/native/libkeyward.so, Envoy's dynamic-modules
# filter) instead of dist/keyward.wasm, from the same envoy/local.yaml (rewritten into .run/ by
# `keyward native-config`).
# Bash 3.2 or later (macOS's /bin/bash works): only portable flags and builtins.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_ENVOY=1
case "${1:-}" in
  --no-envoy) WITH_ENVOY=0 ;;
  "") ;;
  *) echo "usage: $0 [--no-envoy]" >&2; exit 2 ;;
esac

VENV=.venv
RUN=.run
KEYWARD=target/release/keyward
# What this script runs, made by `make deps build` (make run does both).
EXECUTOR="${KEYWARD_EXECUTOR:-wasm}"
case "$EXECUTOR" in
  wasm) MODULE=dist/keyward.wasm ;;
  native) MODULE=dist/native/libkeyward.so ;;
  *) echo "KEYWARD_EXECUTOR must be wasm or native; got '$EXECUTOR'" >&2; exit 2 ;;
esac
for need in "$VENV/bin/bao" "$VENV/bin/python" "$MODULE" "$KEYWARD"; do
  if [ ! -x "$need" ] && [ ! -f "$need" ]; then
    echo "$need is missing: run \`make deps build\` first (from the repository root)" >&2
    exit 1
  fi
done
if [ "$EXECUTOR" = native ] && [ "$WITH_ENVOY" = 0 ]; then
  echo "KEYWARD_EXECUTOR=native runs Envoy here (make run); with func-e (--no-envoy) the wasm filter runs: unset KEYWARD_EXECUTOR" >&2
  exit 2
fi
mkdir -p "$RUN"
chmod 700 "$RUN"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$RUN/k1.key" "$RUN/vault.token" "$RUN/env"
  echo "stopped."
}
# Ctrl-C (or a TERM) is how this script is meant to stop: clean up and exit 0. Any other way out
# (a component that exits, an error) cleans up too and keeps its status.
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

PORTS="8200 8081"
if [ "$WITH_ENVOY" = 1 ]; then PORTS="$PORTS 10000 9901"; fi
for port in $PORTS; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port 127.0.0.1:$port is already in use; stop what runs there (or an earlier make run) first" >&2
    exit 1
  fi
done

wait_http() { # url, name
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start; see $RUN/" >&2
  exit 1
}

# A fresh dev root token and signing key for every run; nothing is reused.
VAULT_TOKEN="dev-root-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export VAULT_TOKEN
KEYWARD_KEY_K1="$(head -c 32 /dev/urandom | base64)"
export KEYWARD_KEY_K1
printf '%s' "$KEYWARD_KEY_K1" > "$RUN/k1.key"; chmod 600 "$RUN/k1.key"
printf '%s' "$VAULT_TOKEN" > "$RUN/vault.token"; chmod 600 "$RUN/vault.token"
# What Envoy needs from its environment (envoy/local.yaml's host_env_keys), for func-e.
( umask 077; printf 'export KEYWARD_KEY_K1=%s\nexport VAULT_TOKEN=%s\n' "$KEYWARD_KEY_K1" "$VAULT_TOKEN" > "$RUN/env" )

echo "starting OpenBao (dev mode) on 127.0.0.1:8200 ..."
"$VENV/bin/bao" server -dev -dev-root-token-id="$VAULT_TOKEN" -dev-listen-address=127.0.0.1:8200 > "$RUN/bao.log" 2>&1 &
pids+=($!)
wait_http http://127.0.0.1:8200/v1/sys/health OpenBao

export BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN="$VAULT_TOKEN"
bao() { "$VENV/bin/bao" "$@" > /dev/null; }
bao kv put secret/demo/stripe    api_key=sk_test_keyward_demo_stripe_0001
bao kv put secret/demo/openai    api_key=sk-keyward-demo-openai-0001
bao kv put secret/demo/anthropic api_key=sk-ant-keyward-demo-0001
bao kv put secret/demo/twilio    account_sid=AC00000000000000000000000000000001 auth_token=keyward_demo_twilio_0001
bao kv put secret/demo/maps      key=keyward-demo-maps-0001
bao kv put secret/keyward/signing k2="$(head -c 32 /dev/urandom | base64)"
bao kv put secret/keyward/revoked "sub:lambda/retired-demo=an example entry"
echo "seeded demo secrets under secret/demo/*"

echo "starting the demo vendor on 127.0.0.1:8081 ..."
"$VENV/bin/python" scripts/demo_vendor.py 8081 > "$RUN/vendor.log" 2>&1 &
pids+=($!)

wait_http http://127.0.0.1:8081/ demo-vendor

if [ "$WITH_ENVOY" = 1 ]; then
  echo "starting Envoy $("$VENV/bin/envoy" --version 2>/dev/null | grep -o '1\.[0-9]*\.[0-9]*' | head -1) with keyward ($EXECUTOR) on 127.0.0.1:10000 ..."
  # Envoy's own log to envoy.log; its stdout is the access log (one JSON line per request),
  # flushed every 200 ms so that `keyward report` sees requests made a moment ago.
  : > "$RUN/envoy.log" # Envoy's --log-path appends: each run starts a new log
  BOOT=envoy/local.yaml
  if [ "$EXECUTOR" = native ]; then
    BOOT="$RUN/local.native.yaml"
    "$KEYWARD" native-config envoy/local.yaml --out "$BOOT"
    export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$(pwd)/dist/native"
  fi
  "$VENV/bin/envoy" -c "$BOOT" --concurrency 2 --log-level warn --component-log-level wasm:info,dynamic_modules:info \
    --log-path "$RUN/envoy.log" --file-flush-interval-msec 200 > "$RUN/access.log" 2>> "$RUN/envoy.log" &
  pids+=($!)
  wait_http http://127.0.0.1:9901/ready Envoy
  # Envoy writes its log every 200 ms: the module's configured line may come just after /ready.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    grep -m1 -o "keyward [0-9.]* ([^)]*) configured.*" "$RUN/envoy.log" && break
    sleep 0.1
  done
else
  cat <<MSG

OpenBao and the demo vendor are up. Start Envoy with func-e in another terminal, from
$(pwd):

  . $RUN/env && func-e run -c envoy/local.yaml

MSG
fi

if [ "$WITH_ENVOY" = 1 ]; then UP="Keyward is up."; else UP="Once Envoy runs (above), Keyward is up."; fi
TOKEN="$("$KEYWARD" mint --kid k1 --key-file "$RUN/k1.key" --sub lambda/demo --ttl 3600 --run make-run \
  --allow "stripe * /v1/**" --allow "openai POST /v1/chat/completions" --allow "anthropic POST /v1/messages" \
  --allow "twilio POST /2010-04-01/Accounts/*/Messages.json" --allow "maps GET /maps/api/geocode/json")"
JTI="$("$KEYWARD" inspect "$TOKEN" --key-file "$RUN/k1.key" | grep -o 'jti=[^ ]*' | cut -d= -f2)"
B64="$(printf 'AC00000000000000000000000000000001:%s' "$TOKEN" | base64 | tr -d '\n')"

cat <<MSG

$UP A demo workload credential (valid 1 hour, sub=lambda/demo):

  export KEYWARD_TOKEN='$TOKEN'

Try it (the demo vendor echoes what it received; look at the authorization header):

  curl -s http://127.0.0.1:10000/stripe/v1/customers -H "Authorization: Bearer \$KEYWARD_TOKEN"
  curl -s -X POST http://127.0.0.1:10000/stripe/v1/payment_intents -H "Authorization: Bearer \$KEYWARD_TOKEN" -H "Idempotency-Key: order-1001" -d amount=100 -d currency=usd
  curl -s http://127.0.0.1:10000/openai/v1/chat/completions -H "Authorization: Bearer \$KEYWARD_TOKEN" -H "content-type: application/json" -d '{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}'
  curl -s http://127.0.0.1:10000/anthropic/v1/messages -H "Authorization: Bearer \$KEYWARD_TOKEN" -H "content-type: application/json" -d '{"model":"claude-sonnet-5","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}'
  curl -s -X POST http://127.0.0.1:10000/twilio/2010-04-01/Accounts/AC00000000000000000000000000000001/Messages.json -H "Authorization: Basic $B64"
  curl -s "http://127.0.0.1:10000/maps/maps/api/geocode/json?address=x" -H "Authorization: Bearer \$KEYWARD_TOKEN"

Denied (JSON errors):

  curl -s -X DELETE http://127.0.0.1:10000/stripe/v1/customers/cus_1 -H "Authorization: Bearer \$KEYWARD_TOKEN"
  curl -s http://127.0.0.1:10000/stripe/v1/customers
  curl -s -X POST http://127.0.0.1:10000/stripe/v1/payment_intents -H "Authorization: Bearer \$KEYWARD_TOKEN" -d amount=100 -d currency=usd

Cap what a credential can spend: 100.00 USD of PaymentIntents (Stripe amounts are in cents),
however many requests try. The second payment does not fit (429 spend_exhausted) and never
reaches the vendor; a retry with the same Idempotency-Key is not charged twice:

  export CAPPED=\$($KEYWARD mint --kid k1 --key-file $RUN/k1.key --sub lambda/demo --allow "stripe POST /v1/payment_intents" --spend 10000)
  curl -s -X POST http://127.0.0.1:10000/stripe/v1/payment_intents -H "Authorization: Bearer \$CAPPED" -H "Idempotency-Key: order-2001" -d amount=6000 -d currency=usd
  curl -s -X POST http://127.0.0.1:10000/stripe/v1/payment_intents -H "Authorization: Bearer \$CAPPED" -H "Idempotency-Key: order-2002" -d amount=4001 -d currency=usd
  curl -s -X POST http://127.0.0.1:10000/stripe/v1/payment_intents -H "Authorization: Bearer \$CAPPED" -H "Idempotency-Key: order-2001" -d amount=6000 -d currency=usd

Cap what an agent can spend on model calls: 5.00 USD (model prices are in micro-dollars, so
--spend 5000000). Each call reserves the most it could cost (its max_tokens and its size) before it
goes on, and is charged what the vendor reports it used: the second call would cross the cap and
never reaches the vendor; a smaller one still fits:

  export AGENT=\$($KEYWARD mint --kid k1 --key-file $RUN/k1.key --sub agent/planner --allow "openai POST /v1/chat/completions" --spend 5000000)
  curl -s http://127.0.0.1:10000/openai/v1/chat/completions -H "Authorization: Bearer \$AGENT" -H "content-type: application/json" -d '{"model":"o1-pro","max_tokens":4000,"messages":[{"role":"user","content":"Plan a trip to Lisbon."}]}' | head -c 300; echo
  curl -s http://127.0.0.1:10000/openai/v1/chat/completions -H "Authorization: Bearer \$AGENT" -H "content-type: application/json" -d '{"model":"o1-pro","max_tokens":4000,"messages":[{"role":"user","content":"Plan a trip to Porto."}]}'
  curl -s http://127.0.0.1:10000/openai/v1/chat/completions -H "Authorization: Bearer \$AGENT" -H "content-type: application/json" -d '{"model":"o1-pro","max_tokens":1000,"messages":[{"role":"user","content":"Plan a trip to Porto."}]}' | head -c 300; echo

Derive a narrower credential for one unit of work (one payment, 5 minutes, labelled):

  $KEYWARD token --attenuate --url http://127.0.0.1:10000 --token-env KEYWARD_TOKEN \\
    --allow "stripe POST /v1/payment_intents" --ttl 300 --total 1 --run order-1001

Revoke the demo credential (denied within 3 s: the list is refreshed every 2 s), list, undo:

  export VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN="\$(cat $RUN/vault.token)"
  $KEYWARD revoke --jti $JTI --reason "trying it out"
  $KEYWARD revoked
  $KEYWARD unrevoke --jti $JTI

Health:  curl -s http://127.0.0.1:10000/keyward/health
Metrics: curl -s http://127.0.0.1:9901/stats/prometheus | grep keyward_
Logs:    $RUN/access.log (one JSON line per request; with func-e, its stdout), Envoy's own in $RUN/envoy.log
Mint:    $KEYWARD mint --kid k1 --key-file $RUN/k1.key --sub SUB --allow "stripe GET /v1/**" [--rpm N] [--total N] [--spend N]
Report:  $KEYWARD report $RUN/access.log   (who called what, and what they spent)

Press Ctrl-C to stop.
MSG

# Until Ctrl-C, or until one of them exits (polled: bash 3.2 cannot wait for any one child).
while :; do
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      # Ctrl-C reaches every process of the group: a component may be gone before this shell runs
      # its INT trap. A moment's pause lets a pending trap run (and exit 0).
      sleep 0.5
      echo "a component exited; see $RUN/*.log" >&2
      exit 1
    fi
  done
  sleep 1
done
