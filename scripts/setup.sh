#!/usr/bin/env bash
# Set up a machine for radai. Safe to run again: it only adds what is missing, and it never stops,
# disables or reconfigures a service that the machine runs for someone else.
#   scripts/setup.sh          what the service needs: a virtual environment with the pinned packages
#   scripts/setup.sh --test   also what only the tests need: Debian's dcmtk, dicom3tools, Orthanc
#                             (a PACS peer), redis-server, Chromium and its driver (browser test),
#                             the test packages, and Redis and PostgreSQL started when not running
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
[ "${1:-}" = "--test" ] && TEST=1

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ "$TEST" -eq 1 ]; then
  need_apt=()
  for pair in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc redis-server:redis-server \
              chromium:chromium chromedriver:chromium-driver; do
    exe=${pair%%:*}; pkg=${pair##*:}
    command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || need_apt+=("$pkg")
  done
  # Orthanc's DICOMweb plugin: the peer of radai's DICOMweb and the remote workers' test archive.
  dpkg -s orthanc-dicomweb >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
  if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
  fi
  # An Orthanc that the machine runs (Debian's service on 4242/8042) is left alone: the tests start
  # their own on free ports.
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, and exactly this version: anything asking pip for a newer torch pulls gigabytes.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
if [ "$TEST" -eq 1 ]; then
  .venv/bin/pip install -q -e '.[test]'
else
  .venv/bin/pip install -q -e .
fi
# The OHIF viewer's static build (pinned, checksummed; served beside DICOMweb). Without network
# or npm/curl the service still runs, DICOMweb without the viewer.
scripts/fetch_ohif.sh || echo "setup: OHIF viewer not fetched; DICOMweb runs without it" >&2
[ "$TEST" -eq 1 ] || exit 0

# Services the tests use, started when not running (commands as the machine's docs give them).
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "setup: starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log 2>/dev/null \
    || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "setup: starting postgresql"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
for _ in $(seq 1 30); do
  (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
  sleep 1
done
