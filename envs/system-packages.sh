#!/usr/bin/env bash
# Debian packages the test suite uses when they can be installed (root + apt-get): chromium for the
# headless-browser test of report.html, slurm + munge for the local Slurm cluster test, and Fashion-MNIST's idx
# files for the `fashion` experiment. Without them those
# tests skip and say why. Safe to run repeatedly.
set -uo pipefail
want=()
command -v chromium >/dev/null || want+=(chromium)
command -v slurmctld >/dev/null || want+=(slurmctld slurmd slurm-client munge)
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)  # the `fashion` experiment's data
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not root or no apt-get; tests that need ${want[*]} will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null \
  || echo "note: could not install ${want[*]}; the tests that need them will be skipped" >&2
