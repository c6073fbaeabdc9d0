#!/usr/bin/env bash
# Install what tests/launch needs for its throwaway Slurm cluster (Debian's Slurm 22.05 and munge),
# if missing. Used by .ci/run and by the test fixture; exits non-zero (with apt's message on stderr)
# where it cannot install them.
set -uo pipefail
pkgs="slurmctld slurmd slurm-client munge"
have() { for t in slurmctld slurmd sbatch sinfo scontrol munged; do PATH=$PATH:/usr/sbin:/sbin command -v $t >/dev/null || return 1; done; }
have && exit 0
command -v apt-get >/dev/null || { echo "Slurm/munge are not installed and there is no apt-get" >&2; exit 1; }
sudo=$([ "$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo "sudo -n")
export DEBIAN_FRONTEND=noninteractive
install() { $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }
install 2>/dev/null || { $sudo apt-get update -qq >/dev/null && install; } || exit 1  # stale package lists: refresh once
have
