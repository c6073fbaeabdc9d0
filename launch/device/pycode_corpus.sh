#!/usr/bin/env bash
# The GPU experiments' corpus (scaling study, Flextron): the Python sources of this machine's
# interpreter (stdlib + site-packages, torch included: ~400 MB), an 8k byte-level BPE, 512-token
# sequences, in data/pycode-512 (prepared once; run from the repo root).
set -euo pipefail
if [ ! -f data/pycode-512/meta.json ]; then
  # one document per source file; files that are not UTF-8, over 1 MB or exact duplicates are left out
  python3 - <<'PY'
import hashlib, os, sysconfig
from pathlib import Path
out, seen, total = Path("data/pycode-src"), set(), 0
out.mkdir(parents=True, exist_ok=True)
for root in sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}):
    for path in sorted(Path(root).rglob("*.py")):
        try:
            raw = path.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha1(raw).hexdigest()
        if len(raw) > 2**20 or not raw.strip() or digest in seen:
            continue
        seen.add(digest)
        total += len(raw)
        (out / f"{digest}.py").write_bytes(raw)
print(f"corpus: {len(seen)} files, {total / 1e6:.0f} MB")
PY
  time python3 -m pretrain prepare-data --input 'data/pycode-src/*.py' --tokenizer train \
      --vocab-size 8192 --seq-len 512 --samples-per-shard 8192 --val-fraction 0.002 --out data/pycode-512 --overwrite
fi
