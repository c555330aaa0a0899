"""Pack rollout timings: a running station (synthetic source, MQTT and API off, 16 synthetic references)
deploys a copy of its pack under another model_id, from a folder and from a .tar.gz, and rolls back;
the seconds are each deploy's final reply `duration_s`, and the rollback call timed around it (what `cmd/deploy`, `cmd/rollback` and the API run).

    python bench/bench_deploy.py --pack packs/default [--out /tmp/bench-deploy]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.line.commands import DeployCommand  # noqa: E402
from edge.line.config import load_config  # noqa: E402
from edge.line.runtime import Runtime  # noqa: E402
from edge.station.enrollment import enroll  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.line.synthetic import write_good_parts  # noqa: E402


def encoder_only_copy(src: Path, dest: Path, model_id: str, edit=None) -> Path:
    """The pack without its LLM, under another model_id (same encoder, so the state still fits);
    `edit(manifest)` may change the manifest before it is written (tests/test_deploy.py)."""
    dest.mkdir(parents=True)
    manifest = yaml.safe_load((src / "pack.yaml").read_text())
    manifest["model_id"] = model_id
    manifest.pop("llm", None)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k == manifest["encoder"]["file"]}
    for entry in manifest["files"].values():
        shutil.copy2(src / entry["path"], dest / entry["path"])
    if edit:
        edit(manifest)
    (dest / "pack.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--out", default="/tmp/bench-deploy")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    first = encoder_only_copy(Path(args.pack), out / "pack-a", "bench-a")
    second = encoder_only_copy(Path(args.pack), out / "pack-b", "bench-b")
    third = encoder_only_copy(Path(args.pack), out / "pack-c", "bench-c")
    with tarfile.open(out / "pack-c.tar.gz", "w:gz") as tar:
        tar.add(third, arcname=".")
    enroll(load_pack(first), write_good_parts(out / "good", 16), out / "state", quiet=True, log=lambda m: None)
    cfg = out / "station.yaml"
    cfg.write_text(yaml.safe_dump({
        "pack": str(first), "state": str(out / "state"), "storage": {"dir": str(out / "var")},
        "source": {"kind": "synthetic", "seed": 0, "defect_rate": 0.2}, "mqtt": {"enabled": False},
        "api": {"enabled": False}, "explain": {"enabled": False}}))
    rt = Runtime(load_config(cfg), cfg).start()
    rows = []
    try:
        for what, source, digest in (("deploy a local folder", second, sha256(second / "pack.yaml")),
                                     ("deploy a local .tar.gz", out / "pack-c.tar.gz", sha256(out / "pack-c.tar.gz"))):
            reply = rt.manager.deploy(DeployCommand(pack=str(source), sha256=digest, request_id=what.replace(" ", "-")))
            rows.append((what, reply.get("duration_s"), reply.get("model_id")))
        t0 = time.perf_counter()  # a rollback reply carries no duration: timed here
        reply = rt.manager.rollback("bench-rollback")
        rows.append(("rollback", round(time.perf_counter() - t0, 2), reply.get("model_id")))
    finally:
        rt.stop()
    print(f"command: python bench/bench_deploy.py --pack {args.pack}")
    print(f"date: {dt.date.today()}  load average (1 min): {os.getloadavg()[0]:.2f}")
    print("\n| step | seconds | model after |\n|---|---|---|")
    for what, seconds, model in rows:
        print(f"| {what} | {seconds} | {model} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
