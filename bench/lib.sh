# bench/lib.sh — helpers shared by the bench/ scripts (sourced, not run).
#
# The sourcing script sets BENCH_NAME (for messages) and, before calling the citygw helpers,
# MQTT_PORT, GRPC_PORT, HTTP_PORT, TOKEN and CITYGW. Every process started through these helpers
# is recorded in PIDS and stopped on exit, also on Ctrl-C; every command line that matters is
# recorded in COMMANDS for the results JSON.

log() { printf '== %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- process bookkeeping
PIDS=()
WORK=""
COMMANDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$WORK" && -z "${KEEP_WORK:-}" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() { # drop a stopped pid from the cleanup list
  local keep=() p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

stop() { # stop PID: SIGTERM, wait up to 20 s, then SIGKILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

port_free() { # fail early if someone else already listens there (we would bench *their* broker)
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is already in use by another process; set BASE_PORT"
  fi
}

wait_port() { # wait_port PORT PID
  local i
  for i in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || die "process $2 exited before listening on $1 (see $WORK/*.log)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listening on 127.0.0.1:$1"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_to_secs() { awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz}'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

run_logged() { # record the exact command line, then run it
  COMMANDS+=("$(printf '%q ' "$@")")
  "$@"
}

metric() { # metric NAME: sum of a Prometheus counter/gauge over all label sets
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $NF} END {printf "%.0f\n", s + 0}'
}

# ---------------------------------------------------------------- preflight
# bench_preflight MIN_NOFILE: data dir on a real disk (fsync must cost what it costs), work dir
# created, soft `ulimit -n` raised to the hard limit and checked against MIN_NOFILE. Sets WORK,
# FS_TYPE, NOFILE, PORT_RANGE.
bench_preflight() {
  local min_nofile=$1
  FS_TYPE=$(stat -f -c %T "$BENCH_DIR")
  case "$FS_TYPE" in
    tmpfs | ramfs) die "$BENCH_DIR is $FS_TYPE: fsync would be free; set BENCH_DIR to a real disk" ;;
  esac
  WORK=$(mktemp -d "$BENCH_DIR/citygw-bench.XXXXXX")
  mkdir -p "$RESULTS"
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  NOFILE=$(ulimit -n)
  if [[ "$NOFILE" != unlimited ]] && ((NOFILE < min_nofile)); then
    die "ulimit -n is $NOFILE (hard limit); need $min_nofile. Raise the hard limit (limits.conf / systemd LimitNOFILE)"
  fi
  PORT_RANGE=$(tr -s '\t ' ' ' </proc/sys/net/ipv4/ip_local_port_range)
}

# machine_json: the machine facts every results JSON carries.
machine_json() {
  jq -n --arg nproc "$(nproc)" --arg kernel "$(uname -sr)" \
    --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    --arg mem "$(awk '/^MemTotal/ {print $2 " kB"}' /proc/meminfo)" \
    --arg fs "$FS_TYPE" --arg workdir "$WORK" --arg nofile "$NOFILE" --arg ports "$PORT_RANGE" \
    '{nproc: ($nproc | tonumber), kernel: $kernel, cpu: $cpu, memory: $mem,
      ulimit_nofile: $nofile, ip_local_port_range: $ports, data_dir_fs: $fs, work_dir: $workdir}'
}

git_commit() { git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown; }

# ---------------------------------------------------------------- citygw
# start_citygw DATA_DIR LOGNAME [ARGS of `citygw run`, e.g. --config FILE] -> $CITYGW_PID
# (CITYGW_* in the environment reach it; MQTT_BIND, default 127.0.0.1, is the MQTT listen address:
# 0.0.0.0 lets clients spread over 127.0.0.x; READY_SECS, default 30, how long it may take to be ready)
start_citygw() {
  local data=$1 logname=$2
  shift 2
  port_free "$MQTT_PORT"
  port_free "$GRPC_PORT"
  port_free "$HTTP_PORT"
  mkdir -p "$data"
  env CITYGW_DATA_DIR="$data" CITYGW_MQTT__LISTEN="${MQTT_BIND:-127.0.0.1}:$MQTT_PORT" \
    CITYGW_GRPC__LISTEN="127.0.0.1:$GRPC_PORT" CITYGW_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" \
    CITYGW_ADMIN__TOKEN="$TOKEN" "$CITYGW" run "$@" >"$WORK/$logname.log" 2>&1 &
  CITYGW_PID=$!
  PIDS+=("$CITYGW_PID")
  COMMANDS+=("CITYGW_DATA_DIR=$data CITYGW_MQTT__LISTEN=${MQTT_BIND:-127.0.0.1}:$MQTT_PORT CITYGW_GRPC__LISTEN=127.0.0.1:$GRPC_PORT CITYGW_HTTP__LISTEN=127.0.0.1:$HTTP_PORT CITYGW_ADMIN__TOKEN=$TOKEN $CITYGW run ${*:+$(printf '%q ' "$@")}&")
  local i
  for i in $(seq 1 $((${READY_SECS:-30} * 10))); do
    kill -0 "$CITYGW_PID" 2>/dev/null || die "citygw exited (see $WORK/$logname.log)"
    curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "citygw not ready (see $WORK/$logname.log)"
}

provision() { # provision COUNT PREFIX -> $WORK/PREFIX.secrets.csv
  local n=$1 prefix=$2
  {
    echo "id,tenant,kind"
    seq -f "$prefix-%06g,bench,air_quality" 0 $((n - 1))
  } >"$WORK/$prefix.devices.csv"
  local t0=$SECONDS
  run_logged "$CITYGW" --server "http://127.0.0.1:$GRPC_PORT" --token "$TOKEN" device import \
    "$WORK/$prefix.devices.csv" --secrets-out "$WORK/$prefix.secrets.csv" >"$WORK/$prefix.import.log" 2>&1 ||
    die "device import failed (see $WORK/$prefix.import.log)"
  log "imported $n devices in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- before/after builds
# build_baseline REV CARGO_BUILD_ARGS...: builds `git archive REV` in target/bench-baseline/REV
# (kept, so a rerun rebuilds only what changed) with this tree's gateway/examples copied in (a
# benchmark's measuring example may be newer than REV; it must use only what REV has), and sets
# BASELINE_BIN to its target/release. A first build starts from a copy of this tree's release
# artifacts, so only the workspace's own crates compile again.
build_baseline() {
  local rev=$1
  shift
  local dir="$ROOT/target/bench-baseline/$rev"
  rm -rf "$dir/src"
  mkdir -p "$dir/src" "$dir/target"
  git -C "$ROOT" archive "$rev" | tar -x -C "$dir/src"
  cp "$ROOT"/gateway/examples/*.rs "$dir/src/gateway/examples/"
  if [[ ! -d "$dir/target/release" && -d "$ROOT/target/release/deps" ]]; then
    cp -a --reflink=auto "$ROOT/target/release" "$dir/target/release"
  fi
  (cd "$dir/src" && CARGO_TARGET_DIR="$dir/target" cargo build --release "$@" >&2)
  COMMANDS+=("git archive $rev | tar -x -C $dir/src; cp gateway/examples/*.rs $dir/src/gateway/examples/; CARGO_TARGET_DIR=$dir/target cargo build --release $*")
  BASELINE_BIN="$dir/target/release"
}
