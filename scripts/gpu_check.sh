#!/usr/bin/env bash
# GPU smoke check for torchgate, for a one-shot run on a machine with an NVIDIA GPU and no
# network (run from the repository root; wheels for what that machine lacks are in .whl/).
#
#   bash scripts/gpu_check.sh        # on the GPU machine; results under $OUT
#   PY=.venv/bin/python SKIP_INSTALL=1 OUT=/tmp/gpu_check_out bash scripts/gpu_check.sh   # dry run
#
# Sections, each guarded (a failure is printed and the next section runs): 1. devices, versions,
# the frontend's imports (gRPC stubs: .whl/fallback holds grpcio + protobuf if this machine's
# refuse them); 2. pytest on tests/handlers/builtin/test_cuda.py + tests/backends/test_workers.py;
# 3. `torchgate serve` on .gpu/ (digits 1.0 TorchScript x2 workers, digits 2.0 ONNX x1, one GPU):
# worker devices, a prediction from each version over REST and one over gRPC; 4. `python -m
# benchmarks.load` (python engine) at 1,32,200 connections, and benchmarks.ipc; 5. SIGTERM:
# exit status 0, no zygote or worker process left. The script keeps to TOTAL_BUDGET seconds
# (default 300, plus up to 30 s for the stop). Writes 8 files to $OUT: gpu_check.log (everything
# printed), summary.json, server.log, pytest.log, pytest.xml, bench.json, ipc.txt, models.json.
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
STORE=${STORE:-$PWD/.gpu}
TOTAL_BUDGET=${TOTAL_BUDGET:-300}
BENCH_DURATION=${BENCH_DURATION:-5s}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
BENCH_CONCURRENCY=${BENCH_CONCURRENCY:-1,32,200}
IPC_CALLS=${IPC_CALLS:-2000}
PYTEST_X=${PYTEST_X:-}  # -x to stop at the first failure
NUMBER_OF_GPU=${NUMBER_OF_GPU:-1}  # 0: the same run with CPU workers, for comparison
SKIP_PYTEST=${SKIP_PYTEST:-0}
JOB_QUEUE_SIZE=${JOB_QUEUE_SIZE:-100}  # as in config.properties: beyond it, 503 (counted as errors)
# Warnings as errors, as pyproject's pytest filterwarnings has them.
STRICT="-W error -W ignore::DeprecationWarning -W ignore::PendingDeprecationWarning -W ignore::ResourceWarning"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MARK="gpu_check_$$_$RANDOM"  # in the environment of everything that starts a zygote
SERVER_PID=""
ARCHIVER_MADE=""

# ---- helpers --------------------------------------------------------------------------------
cat >"$WORK/h.py" <<'PYEOF'
import json, os, socket, sys, time, urllib.error, urllib.request

def http(method, url, body=None, timeout=30.0):
    data = body.encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except Exception as e:
        return 0, f"{type(e).__name__}: {e}"

def show(status, text, save=None):
    try:
        doc = json.loads(text)
        text = json.dumps(doc, indent=1)
    except ValueError:
        doc = text
    print(f"HTTP {status}\n{text}")
    if save:
        with open(save, "w") as f:
            json.dump({"status": status, "body": doc}, f, indent=1)
    return 0 if 200 <= status < 300 else 1

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def marked(mark):
    """pid, cmdline of every process whose environment holds GPU_CHECK_MARK=mark."""
    found, needle = [], f"GPU_CHECK_MARK={mark}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if alive(int(name)):
            found.append((int(name), cmd))
    return found

def bench_lines(doc):
    for r in doc.get("results", []):
        # benchmarks.load: "rps" counts successful answers only; "requests" counts every answer.
        n = r.get("requests", 0)
        answers = n / r["duration_s"] if r.get("duration_s") else 0.0
        bad = {k: v for k, v in (r.get("errors") or {}).items() if v}
        print(f"bench c={r.get('concurrency'):>3}: {r.get('rps', 0):8.0f} ok/s "
              f"({answers:.0f} answers/s), p50 {r.get('p50_ms', 0):.2f} ms, p95 {r.get('p95_ms', 0):.2f} ms,"
              f" p99 {r.get('p99_ms', 0):.2f} ms, max {r.get('max_ms', 0):.1f} ms, "
              f"{n} requests, errors {bad or 0}")

def main(cmd, *args):
    if cmd == "ports":
        socks = [socket.socket() for _ in range(int(args[0]))]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        print(" ".join(str(s.getsockname()[1]) for s in socks))
        return 0
    if cmd == "wait":  # URL TIMEOUT PID: until 200, the deadline, or the process is gone
        url, deadline, pid = args[0], time.monotonic() + float(args[1]), int(args[2])
        start = time.monotonic()
        while time.monotonic() < deadline:
            status, text = http("GET", url, timeout=2)
            if status == 200:
                print(f"ready after {time.monotonic() - start:.1f} s: {text.strip()}")
                return 0
            if not alive(pid):
                print(f"server process {pid} exited while waiting (last answer {status})")
                return 1
            time.sleep(0.5)
        print(f"not ready within {args[1]} s (last answer {status}: {text[:300]})")
        return 1
    if cmd == "get":  # URL [SAVE]
        return show(*http("GET", args[0]), save=args[1] if len(args) > 1 else None)
    if cmd == "post":  # URL BODY [SAVE]
        return show(*http("POST", args[0], args[1]), save=args[2] if len(args) > 2 else None)
    if cmd == "metrics":  # URL: the GPU and worker lines of the Prometheus text
        status, text = http("GET", args[0])
        lines = [l for l in text.splitlines() if not l.startswith("#") and
                 ("gpu" in l.lower() or "GPU" in l)]
        print(f"HTTP {status}, {len(lines)} GPU sample(s)")
        print("\n".join(lines[:20]))
        return 0
    if cmd == "workers":  # MODELS_JSON: "pid device status" per worker
        doc = json.load(open(args[0]))["body"]
        for version in doc if isinstance(doc, list) else []:
            for w in version.get("workers", []):
                print(w.get("pid"), version.get("modelVersion"), w.get("device"), w.get("status"))
        return 0
    if cmd == "bench":  # BENCH_JSON: one line per point
        try:
            bench_lines(json.load(open(args[0])))
        except (OSError, ValueError) as exc:
            print(f"no bench results: {exc}")
            return 1
        return 0
    if cmd == "children":  # PID: its child processes
        kids = []
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == args[0]:
                        kids.append(name)
            except (OSError, IndexError):
                continue
        print(" ".join(kids))
        return 0
    if cmd == "alive":  # PID...: those still running
        print(" ".join(a for a in args if a.isdigit() and alive(int(a))))
        return 0
    if cmd == "marked":  # MARK [kill]
        found = marked(args[0])
        for pid, cmdline in found:
            print(f"{pid} {cmdline[:200]}")
            if len(args) > 1 and args[1] == "kill":
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        return 1 if found else 0
    if cmd == "summary":  # WORK OUT
        work, out = args
        summary = {"results": {}}
        with open(os.path.join(work, "results.tsv")) as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition("\t")
                summary["results"][key] = value
        for name in ("device.json", "models.json", "bench.json", "predict_v1.json",
                     "predict_v2.json"):
            for base in (work, out):
                path = os.path.join(base, name)
                if os.path.exists(path):
                    try:
                        summary[name.removesuffix(".json")] = json.load(open(path))
                    except ValueError as exc:
                        summary[name.removesuffix(".json")] = f"unreadable: {exc}"
                    break
        for name in ("ipc.txt", "pytest_tail.txt", "server_tail.txt"):
            path = os.path.join(work if name != "ipc.txt" else out, name)
            if os.path.exists(path):
                summary[name.removesuffix(".txt")] = open(path).read().splitlines()
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary["results"], indent=1))
        if isinstance(summary.get("bench"), dict):
            bench_lines(summary["bench"])
        for line in summary.get("ipc", []):
            print("ipc |", line)
        return 0
    raise SystemExit(f"unknown command {cmd}")

sys.exit(main(*sys.argv[1:]))
PYEOF
h() { "$PY" "$WORK/h.py" "$@"; }
: >"$WORK/results.tsv"
result() { printf '%s\t%s\n' "$1" "$2" >>"$WORK/results.tsv"; echo ">>> RESULT $1: $2"; }
section() { echo; echo "==== [$(date +%T) +${SECONDS}s] $*"; }
# Seconds a step may take: at most $1, and never past the budget less $2 kept for what follows.
budget() {
    local left=$((TOTAL_BUDGET - SECONDS - ${2:-0}))
    [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}

running() {  # the process exists and is not a zombie
    local state
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

stop_server() {  # SIGTERM, SIGKILL after $1 s; returns the server's exit status
    local pid=$SERVER_PID t0 code
    [ -n "$pid" ] || return 0
    t0=$(date +%s.%N)
    kill -TERM "$pid" 2>/dev/null
    while running "$pid" && [ "$(awk "BEGIN{print ($(date +%s.%N) - $t0) < ${1:-30}}")" = 1 ]; do
        sleep 0.1
    done
    if running "$pid"; then
        echo "server $pid still running after ${1:-30} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    code=$?
    STOP_SECONDS=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}")
    SERVER_PID=""
    return $code
}

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        echo "cleanup: stopping server $SERVER_PID"
        stop_server 10
    fi
    h marked "$MARK" kill >/dev/null 2>&1
    if [ -n "$ARCHIVER_MADE" ]; then rm -f "$ARCHIVER_MADE"; fi
    rm -rf "$WORK"
}

main() {
    # main runs in the pipeline's subshell: its traps, its children, its SERVER_PID.
    trap cleanup EXIT
    trap 'echo "interrupted"; exit 130' INT TERM
    section "0. environment"
    echo "repo $PWD, python $PY, OUT $OUT, store $STORE, budget ${TOTAL_BUDGET}s"
    echo "PYTHONPATH=$PYTHONPATH"
    nproc; free -g 2>/dev/null | head -2; uname -r
    git log --oneline -1 2>/dev/null
    git status --short 2>/dev/null | head -20

    # ---- 1. devices ---------------------------------------------------------------------------
    section "1. devices"
    if timeout 30 nvidia-smi -L; then result nvidia_smi ok; else result nvidia_smi "failed ($?)"; fi
    timeout 60 "$PY" -W ignore - "$WORK/device.json" <<'PYEOF'
import importlib, json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(),
                device_count=torch.cuda.device_count(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        x = torch.ones(1024, 1024, device="cuda")
        info["cuda_matmul_ok"] = bool((x @ x)[0, 0].item() == 1024.0)
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
versions = {}
for name in ("numpy", "onnx", "onnxruntime", "google.protobuf", "grpc", "fastapi", "starlette",
             "pydantic", "pydantic_core", "uvicorn", "httptools", "uvloop", "orjson", "anyio",
             "typing_extensions", "multipart", "ts", "model_archiver", "prometheus_client",
             "PIL", "yaml", "pynvml", "sklearn", "tokenizers", "h11", "click", "idna"):
    try:
        mod = importlib.import_module(name)
        versions[name] = f"{getattr(mod, '__version__', getattr(mod, 'VERSION', '?'))} " \
                         f"{(getattr(mod, '__file__', '') or '').rsplit('/', 2)[0]}"
    except Exception as exc:
        versions[name] = f"MISSING {type(exc).__name__}: {exc}"
info["versions"] = versions
try:
    import onnxruntime
    info["ort_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
PYEOF
    result torch "$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("torch"), "cuda", d.get("cuda_available"), "devices", d.get("device_count"), d.get("devices", ""))' "$WORK/device.json" 2>&1)"

    # gRPC stubs (generated here with grpcio-tools 1.81.1 / protoc 6.33.5): they need grpcio >=
    # 1.81.1 and protobuf 6.33.5..7. If this machine's pair refuses them, use the carried pair.
    section "1b. gRPC stubs and the frontend's imports"
    if timeout 60 "$PY" $STRICT -c 'import api.rpc.server, api.server, benchmarks.load; print("frontend imports ok")' 2>"$WORK/imp.err"; then
        result grpc_stubs "import ok with this machine's grpcio/protobuf"
    else
        tail -5 "$WORK/imp.err"
        if [ "${SKIP_INSTALL:-0}" != 1 ] && ls .whl/fallback/*.whl >/dev/null 2>&1; then
            echo "installing the carried fallback: $(ls .whl/fallback)"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fallback/*.whl
            if timeout 60 "$PY" -c 'import api.rpc.server, api.server; import grpc, google.protobuf as p; print("ok with grpcio", grpc.__version__, "protobuf", p.__version__)' 2>"$WORK/imp.err"; then
                result grpc_stubs "import ok after installing .whl/fallback"
            else
                tail -5 "$WORK/imp.err"; result grpc_stubs "FAILED even with .whl/fallback"
            fi
        elif timeout 60 "$PY" -c 'import api.rpc.server, api.server' 2>"$WORK/imp.err"; then
            result grpc_stubs "import ok, with warnings (see above)"
        else
            tail -5 "$WORK/imp.err"; result grpc_stubs "FAILED"
        fi
    fi

    # ---- 2. tests -----------------------------------------------------------------------------
    section "2. pytest: tests/handlers/builtin/test_cuda.py tests/backends/test_workers.py"
    # tests/support/archives.py runs torch-model-archiver beside sys.executable; pip --target
    # put ours in /tmp/site/bin, so put a launcher where the tests look (removed at exit).
    local archiver
    archiver="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/torch-model-archiver"
    if [ ! -x "$archiver" ]; then
        local exe
        exe=$("$PY" -c 'import sys; print(sys.executable)')
        printf '#!/bin/sh\nexec "%s" -c "import sys; from model_archiver.model_packaging import generate_model_archive; sys.argv[0] = \\"torch-model-archiver\\"; sys.exit(generate_model_archive())" "$@"\n' "$exe" >"$archiver" \
            && chmod +x "$archiver" && ARCHIVER_MADE=$archiver && echo "made $archiver" \
            || echo "WARNING: cannot write $archiver: tests that build archives will fail"
    fi
    local t code
    if [ "$SKIP_PYTEST" = 1 ]; then
        result pytest "skipped (SKIP_PYTEST=1)"
    else
    t=$(budget 150 140)
    echo "(timeout ${t}s)"
    GPU_CHECK_MARK=$MARK timeout -k 5 "$t" "$PY" -m pytest -q -p no:cacheprovider \
        tests/handlers/builtin/test_cuda.py tests/backends/test_workers.py $PYTEST_X --timeout 120 \
        -rfEs --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
    code=$?
    tail -25 "$OUT/pytest.log" | tee "$WORK/pytest_tail.txt"
    [ "$code" = 124 ] || [ "$code" = 137 ] && echo "pytest TIMED OUT after ${t}s"
    result pytest "exit $code$([ "$code" = 124 ] && echo ' (TIMED OUT)'): $(grep -E '(passed|failed|error|skipped)' "$OUT/pytest.log" | tail -1)"
    h marked "$MARK" kill | sed 's/^/leftover after pytest (killed): /'
    fi

    # ---- 3. torchgate serve -------------------------------------------------------------------
    section "3. torchgate serve on $STORE"
    ls -la "$STORE"
    local ports inf mgmt met gi gm
    ports=$(h ports 5)
    read -r inf mgmt met gi gm <<<"$ports"
    cat >"$WORK/config.properties" <<EOF
inference_address=http://127.0.0.1:$inf
management_address=http://127.0.0.1:$mgmt
metrics_address=http://127.0.0.1:$met
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port=$gi
grpc_management_port=$gm
model_store=$STORE
load_models=digits.mar,digits_v2.mar
disable_token_authorization=true
number_of_gpu=$NUMBER_OF_GPU
job_queue_size=$JOB_QUEUE_SIZE
default_response_timeout=30
torchgate.snapshot_file=
models={"digits": {\\
  "1.0": {"defaultVersion": true, "marName": "digits.mar", "minWorkers": 2, "maxWorkers": 2,\\
          "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30},\\
  "2.0": {"defaultVersion": false, "marName": "digits_v2.mar", "minWorkers": 1, "maxWorkers": 1,\\
          "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30}}}
EOF
    cat "$WORK/config.properties"
    local started=$SECONDS
    GPU_CHECK_MARK=$MARK "$PY" -m api.cli serve --config "$WORK/config.properties" --ncs \
        --no-access-log >"$OUT/server.log" 2>&1 </dev/null &
    SERVER_PID=$!
    echo "server pid $SERVER_PID"
    local ready=0
    if h wait "http://127.0.0.1:$inf/ping" "$(budget 120 75)" "$SERVER_PID"; then
        ready=1; result server_ready "yes, after $((SECONDS - started)) s"
    else
        result server_ready "NO"
    fi
    local zygote="" workers=""
    if [ "$ready" = 1 ]; then
        h get "http://127.0.0.1:$mgmt/models/digits/all" "$OUT/models.json"
        echo "--- workers (pid version device status)"
        h workers "$OUT/models.json" | tee "$WORK/workers.txt"
        result worker_devices "$(awk '{printf "%s:%s:%s ", $2, $3, $4}' "$WORK/workers.txt")"
        workers=$(awk '{print $1}' "$WORK/workers.txt" | tr '\n' ' ')
        zygote=$(h children "$SERVER_PID")
        echo "zygote pid(s): $zygote; worker pids: $workers"
        local body="[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]"
        echo "--- POST /predictions/digits (TorchScript 1.0; the input is load_digits()[0], a 0)"
        if h post "http://127.0.0.1:$inf/predictions/digits" "$body" "$WORK/predict_v1.json"; then
            result predict_v1 "ok $(tr -d '\n ' <"$WORK/predict_v1.json" | cut -c1-160)"
        else result predict_v1 "FAILED"; fi
        echo "--- POST /predictions/digits/2.0 (ONNX)"
        if h post "http://127.0.0.1:$inf/predictions/digits/2.0" "$body" "$WORK/predict_v2.json"; then
            result predict_v2 "ok $(tr -d '\n ' <"$WORK/predict_v2.json" | cut -c1-160)"
        else result predict_v2 "FAILED"; fi
        echo "--- gRPC (this machine's grpcio/protobuf): Ping, Predictions digits"
        if timeout 30 "$PY" - "$gi" "$body" <<'PYEOF'
import sys, grpc
from google.protobuf import empty_pb2
from api.rpc.generated import inference_pb2, inference_pb2_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    print("Ping:", stub.Ping(empty_pb2.Empty(), timeout=10).health.strip())
    request = inference_pb2.PredictionsRequest(model_name="digits", input={"data": sys.argv[2].encode()})
    print("Predictions:", stub.Predictions(request, timeout=10).prediction.decode()[:200])
PYEOF
        then result grpc "ok"; else result grpc "FAILED"; fi
        echo "--- GPU series on the metrics port"
        h metrics "http://127.0.0.1:$met/metrics"
        timeout 20 nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1 | head -10

        # ---- 4. load -------------------------------------------------------------------------
        section "4a. benchmarks.load (python engine) c=$BENCH_CONCURRENCY, $BENCH_DURATION per point"
        t=$(budget 60 45)
        echo "(timeout ${t}s)"
        timeout -k 5 "$t" "$PY" -m benchmarks.load --url "http://127.0.0.1:$inf/predictions/digits" \
            --concurrency "$BENCH_CONCURRENCY" --duration "$BENCH_DURATION" \
            --warmup "$BENCH_WARMUP" --engine python --json --body-json "$body" \
            >"$OUT/bench.json" 2>"$WORK/bench.err"
        code=$?
        h bench "$OUT/bench.json"; tail -5 "$WORK/bench.err"
        result bench "exit $code"
        echo "--- after the load"
        h get "http://127.0.0.1:$mgmt/models/digits/all" >"$WORK/models_after.txt"
        grep -E '"(pid|device|status|restarts)"' "$WORK/models_after.txt" | tr -d ' ' | paste -sd' ' | cut -c1-600
        timeout 20 nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>&1 | head -5
    else
        echo "--- server log tail"; tail -40 "$OUT/server.log"
    fi

    section "4b. benchmarks.ipc --calls $IPC_CALLS (frontend <-> worker round trip, no HTTP)"
    t=$(budget 60 5)
    echo "(timeout ${t}s)"
    GPU_CHECK_MARK=$MARK timeout -k 5 "$t" "$PY" -m benchmarks.ipc --calls "$IPC_CALLS" \
        >"$OUT/ipc.txt" 2>"$WORK/ipc.err"
    code=$?
    cat "$OUT/ipc.txt"; tail -5 "$WORK/ipc.err"
    result ipc "exit $code"

    # ---- 5. stop ------------------------------------------------------------------------------
    section "5. SIGTERM the server"
    if [ -n "$SERVER_PID" ]; then
        local pids_before="$SERVER_PID $zygote $workers"
        stop_server 30
        code=$?
        result server_exit "exit $code after ${STOP_SECONDS}s"
        sleep 1
        local left
        left=$(h alive $pids_before)
        echo "of pids $pids_before still alive: '${left}'"
        local marked
        marked=$(h marked "$MARK")
        if [ -z "$left" ] && [ -z "$marked" ]; then
            result leftovers "none"
        else
            echo "$marked"
            result leftovers "LEFT: ${left} / $(echo "$marked" | awk '{print $1}' | tr '\n' ' ')"
            h marked "$MARK" kill >/dev/null
        fi
    else
        result server_exit "not running"
    fi
    tail -15 "$OUT/server.log" | tee "$WORK/server_tail.txt"
    echo "errors/tracebacks in server.log: $(grep -cE 'Traceback|ERROR' "$OUT/server.log")"
    grep -E 'Traceback|ERROR' "$OUT/server.log" | head -10

    section "summary (also $OUT/summary.json), ${SECONDS}s in all"
    h summary "$WORK" "$OUT"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
