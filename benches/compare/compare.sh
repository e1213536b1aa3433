#!/usr/bin/env bash
# x402d's HTTP `POST /verify` against the reference x402 facilitator
# (`@x402/core`'s x402Facilitator with `@x402/evm`'s exact scheme, see
# reference-facilitator.mjs), on the same machine and the same anvil chain,
# in one run, under the same load: `x402d load --verify-url`, the same
# number of requests in flight, fresh signed payments from the same payers.
# Prints both reports and the ratio of their throughputs.
#
#   benches/compare/compare.sh                 # defaults below
#   N=200000 REF_N=5000 CONCURRENCY=64 benches/compare/compare.sh
#
# N and REF_N are the requests sent to x402d and to the reference (the
# reference is slower: fewer requests keep its run short). Needs `npm ci`
# (the reference packages and anvil) and builds x402d in release mode.
set -euo pipefail

N=${N:-200000}
REF_N=${REF_N:-5000}
CONCURRENCY=${CONCURRENCY:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

[ -d node_modules/@x402/core ] || npm ci --no-audit --no-fund
if [ -z "${X402D:-}" ]; then
  cargo build --release --quiet --workspace --bin x402d --bin x402d-load
  X402D="${CARGO_TARGET_DIR:-$ROOT/target}/release/x402d"
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits up to 60 s for a line matching $2 in file $1 and prints it.
wait_for() {
  for _ in $(seq 600); do
    if line=$(grep -m1 -E "$2" "$1"); then echo "$line"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}

echo "starting x402d dev (anvil, the test token, funded payers)…" >&2
RUST_LOG=warn "$X402D" dev --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --data-dir "$work/ledger" \
  >"$work/x402d.out" 2>"$work/x402d.err" &
pids+=($!)
x402d_pid=$!
x402d_http=$(wait_for "$work/x402d.out" '^x402d listening' | sed -E 's/.*http=([^ ]+).*/\1/')
rpc=$(wait_for "$work/x402d.out" '^chain ' | awk '{print $2}')

echo "starting the reference facilitator on $rpc…" >&2
RPC_URL="$rpc" node benches/compare/reference-facilitator.mjs >"$work/ref.out" 2>"$work/ref.err" &
pids+=($!)
ref_pid=$!
ref_url=$(wait_for "$work/ref.out" '^listening ' | awk '{print $2}')

run() { # url n pid
  "$X402D" load --verify-url "$1" -n "$2" -c "$CONCURRENCY" --watch-pid "$3" --json
}

echo "x402d /verify: $N requests, $CONCURRENCY in flight" >&2
ours=$(run "http://$x402d_http" "$N" "$x402d_pid")
echo "reference /verify: $REF_N requests, $CONCURRENCY in flight" >&2
theirs=$(run "$ref_url" "$REF_N" "$ref_pid")

OURS="$ours" THEIRS="$theirs" CONCURRENCY="$CONCURRENCY" node -e '
const ours = JSON.parse(process.env.OURS), theirs = JSON.parse(process.env.THEIRS);
const row = (name, r) => {
  const maxRss = Math.max(0, ...(r.rss_kib || []).map((s) => s[1])) / 1024;
  const rejected = Object.entries(r.rejected).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
  console.log(`${name.padEnd(10)} ${String(r.payments).padStart(8)} ${r.per_second.toFixed(0).padStart(9)}/s` +
    `   p50 ${(r.latency_p50_us / 1000).toFixed(2)} ms  p99 ${(r.latency_p99_us / 1000).toFixed(2)} ms` +
    `   rss ${maxRss.toFixed(0)} MiB   rejected: ${rejected}`);
};
console.log(`POST /verify, ${process.env.CONCURRENCY} requests in flight, on the same anvil chain`);
row("x402d", ours);
row("reference", theirs);
console.log(`ratio      ${(ours.per_second / theirs.per_second).toFixed(1)}x`);
if (ours.accepted !== ours.payments || theirs.accepted !== theirs.payments) {
  console.error("not every payment verified: the comparison does not hold");
  process.exit(1);
}
'
