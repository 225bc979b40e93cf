#!/usr/bin/env bash
# End-to-end container test: builds the CPU image from the Dockerfile, runs it, and checks /health and one
# small job over HTTP. Uses podman (no Docker daemon, no registry: the base image is made locally by
# docker/make-base-image.sh). Exits non-zero on any failure; every wait is bounded.
#
#   docker/test-container.sh            # or: make test-container
#
# Environment (all optional):
#   HOGWILD_TEST_IMAGE          image tag to build and run (localhost/hogwild-server:cpu)
#   HOGWILD_TEST_BASE_IMAGE     base image (localhost/hogwild-base:bookworm, made if missing)
#   HOGWILD_TEST_SKIP_BUILD=1   run the existing image as it is
#   HOGWILD_TEST_CACHE_VOLUME   a named volume for /cache kept between runs (default: a fresh one, removed)
#   HOGWILD_TEST_TORCH_INDEX_URL  index for the CPU torch build (default: none, i.e. the host's pip sources)
#   HOGWILD_TEST_BUILD_TIMEOUT (2400), HOGWILD_TEST_START_TIMEOUT (600), HOGWILD_TEST_JOB_TIMEOUT (300): seconds
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

image="${HOGWILD_TEST_IMAGE:-localhost/hogwild-server:cpu}"
base="${HOGWILD_TEST_BASE_IMAGE:-localhost/hogwild-base:bookworm}"
torch_index="${HOGWILD_TEST_TORCH_INDEX_URL:-}"
build_timeout="${HOGWILD_TEST_BUILD_TIMEOUT:-2400}"
start_timeout="${HOGWILD_TEST_START_TIMEOUT:-600}"
job_timeout="${HOGWILD_TEST_JOB_TIMEOUT:-300}"
api_key="test-key-$$"
name="hogwild-test-$$"

t0=$SECONDS
log() { printf 'test-container [%4ds]: %s\n' "$((SECONDS - t0))" "$*" >&2; }
# Podman without systemd complains about healthcheck timers on every run/stop; the check itself works.
quiet() { "$@" 2> >(grep -v 'systemd connection' >&2 || true); }
die() {
    log "FAILED: $*"
    exit 1
}

# --- tools ---------------------------------------------------------------------------------------------
missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "missing ${missing[*]} (install podman buildah runc debootstrap)"
    fi
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        podman buildah runc debootstrap >/dev/null
fi
command -v python3 >/dev/null || die "python3 is needed on the host for the HTTP checks"

# --- base image ----------------------------------------------------------------------------------------
"$here/make-base-image.sh" "$base"

# --- build ---------------------------------------------------------------------------------------------
# pip inside the build uses the host's package sources: the PIP_* settings (environment first, then pip's
# configuration) are passed as build arguments, and local folders they name are mounted read-only.
pip_setting() { # $1: env name, $2: pip config key
    local value="${!1:-}"
    if [[ -z "$value" ]] && python3 -m pip --version >/dev/null 2>&1; then
        value="$(python3 -m pip config get "global.$2" 2>/dev/null || true)"
    fi
    printf '%s' "$value" | tr '\n' ' ' | sed 's/ *$//'
}
build_args=()
mounts=()
declare -A mounted=()
for pair in PIP_INDEX_URL:index-url PIP_EXTRA_INDEX_URL:extra-index-url PIP_FIND_LINKS:find-links \
    PIP_TRUSTED_HOST:trusted-host; do
    var="${pair%%:*}"
    value="$(pip_setting "$var" "${pair#*:}")"
    [[ -n "$value" ]] || continue
    build_args+=(--build-arg "$var=$value")
    for location in $value; do
        path="${location#file://}"
        # A local index's pages point next to it (DIR/simple/NAME -> DIR/files/...): mount DIR.
        if [[ "$var" == *INDEX_URL && "$location" == file://* ]]; then
            path="$(dirname "$path")"
        fi
        if [[ "$path" == /* && -e "$path" && -z "${mounted[$path]:-}" ]]; then
            mounted[$path]=1
            mounts+=(--volume "$path:$path:ro")
        fi
    done
done

if [[ "${HOGWILD_TEST_SKIP_BUILD:-0}" == 1 ]]; then
    podman image exists "$image" || die "HOGWILD_TEST_SKIP_BUILD=1 but $image does not exist"
    log "using the existing $image"
else
    build_log="$(mktemp /tmp/hogwild-build.XXXXXX.log)"
    log "building $image from $base (log: $build_log)"
    tb=$SECONDS
    if ! timeout "$build_timeout" podman build --isolation chroot --format docker --network host \
        --build-arg "BASE_IMAGE=$base" --build-arg DEVICE=cpu --build-arg "TORCH_INDEX_URL=$torch_index" \
        "${build_args[@]}" "${mounts[@]}" -t "$image" -f "$root/Dockerfile" "$root" >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        die "podman build failed (full log: $build_log)"
    fi
    log "built in $((SECONDS - tb)) s; $(podman image inspect --format '{{.Size}}' "$image") bytes"
    rm -f "$build_log"
fi

# --- run -----------------------------------------------------------------------------------------------
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
volume="${HOGWILD_TEST_CACHE_VOLUME:-hogwild-test-cache-$$}"
cleanup() {
    local rc=$?
    if podman container exists "$name" 2>/dev/null; then
        if ((rc != 0)); then
            log "container log (last 60 lines):"
            podman logs --tail 60 "$name" >&2 2>&1 || true
        fi
        timeout 60 podman stop -t 10 "$name" >/dev/null 2>&1 || true
        timeout 60 podman rm -f "$name" >/dev/null 2>&1 || true
    fi
    if [[ -z "${HOGWILD_TEST_CACHE_VOLUME:-}" ]]; then
        timeout 60 podman volume rm -f "$volume" >/dev/null 2>&1 || true
    fi
    exit "$rc"
}
trap cleanup EXIT

log "starting $name on 127.0.0.1:$port (volume $volume)"
# --health-interval=disable: no systemd timer here; the HEALTHCHECK is run on demand below.
quiet podman run -d --name "$name" --network host --health-interval=disable \
    -e HOGWILD_HOST=127.0.0.1 -e HOGWILD_PORT="$port" -e HOGWILD_API_KEY="$api_key" \
    -v "$volume:/cache" "$image" >/dev/null

ts=$SECONDS
python3 - "$name" "$port" "$api_key" "$start_timeout" "$job_timeout" <<'EOF'
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

name, port, key, start_timeout, job_timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:])
base = f"http://127.0.0.1:{port}"
t0 = time.monotonic()


def say(msg: str) -> None:
    print(f"test-container [http {time.monotonic() - t0:6.1f}s]: {msg}", file=sys.stderr, flush=True)


def request(method: str, path: str, body: dict | None = None, auth: bool = True) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def running() -> bool:
    out = subprocess.run(["podman", "inspect", "-f", "{{.State.Running}}", name],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "true"


def wait_for(path: str, deadline: float) -> int:
    status = 0
    while time.monotonic() < deadline:
        if not running():
            sys.exit(f"the container stopped while waiting for {path}")
        try:
            status, _ = request("GET", path, auth=False)
            if status in (200, 404):
                return status
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{path} did not answer 200 within {start_timeout:.0f} s (last status {status})")


deadline = t0 + start_timeout
wait_for("/health", deadline)
say("/health answers 200")
if wait_for("/ready", deadline) == 200:
    say("/ready answers 200 (model loaded)")

status, page = request("GET", "/", auth=False)
if status != 200 or "<html" not in str(page).lower():
    sys.exit(f"GET / (the dashboard) answered {status}: {str(page)[:200]}")
say("GET / serves the dashboard")

body = {"prompt": "What is 2 + 3?", "workers": 2, "max_tokens": 16}
status, job = request("POST", "/v1/jobs", body)
if status != 201 or not isinstance(job, dict) or "id" not in job:
    sys.exit(f"POST /v1/jobs answered {status}: {job}")
say(f"job {job['id']} created ({job.get('status')})")

ends = {"finished", "cancelled", "failed"}
deadline = time.monotonic() + job_timeout
while job.get("status") not in ends:
    if time.monotonic() > deadline:
        sys.exit(f"job still {job.get('status')} after {job_timeout:.0f} s")
    time.sleep(0.5)
    status, job = request("GET", f"/v1/jobs/{job['id']}")
    if status != 200 or not isinstance(job, dict):
        sys.exit(f"GET /v1/jobs/{{id}} answered {status}: {job}")

workers = job.get("workers") or []
texts = [w.get("text") or "" for w in workers]
say(f"job ended: status={job['status']} finish_reason={job.get('finish_reason')} usage={job.get('usage')}")
for w, text in zip(workers, texts):
    say(f"  worker {w.get('index')} {w.get('name')}: {text!r}")
if job["status"] != "finished":
    sys.exit(f"job ended as {job['status']}: {job.get('error')}")
if len(workers) != 2 or not all(t.strip() for t in texts):
    sys.exit("expected two workers with text")
EOF
log "HTTP checks passed in $((SECONDS - ts)) s (start, model fetch on a fresh volume, one job)"

# The CPU image compiles the engine's C++ kernels on a host CPU with AVX512-BF16 (the image carries g++).
if grep -q avx512_bf16 /proc/cpuinfo; then
    engine_log="$(podman logs "$name" 2>&1)"
    if ! grep -q "loading the CPU kernels" <<<"$engine_log" || grep -q "CPU kernels unavailable" <<<"$engine_log"; then
        grep "CPU kernels" <<<"$engine_log" >&2 || true
        die "the engine could not build its CPU kernels in the image"
    fi
    log "the engine built and uses its CPU kernels"
fi

# The image's HEALTHCHECK itself (podman runs it on demand; no systemd timers here).
timeout 60 podman healthcheck run "$name" >/dev/null || die "the image's HEALTHCHECK failed"
log "HEALTHCHECK passes"

quiet timeout 60 podman stop -t 10 "$name" >/dev/null || die "podman stop failed"
log "PASSED in $((SECONDS - t0)) s"
