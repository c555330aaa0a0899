"""Pack (and station state) rollout with rollback: fetch, verify, trial-score, switch, record.

A deployment names a pack by a local folder, a file:// URL or an http(s) URL of a .tar.gz archive, with
the sha256 of its `pack.yaml` (a folder) or of the archive. It is copied or downloaded (size limit,
time limit) into a staging folder under `<storage.dir>/deploy/`, checked (the hash; `load_pack`, which
checks every listed file's sha256; the input size, colour and encoder against the state it will score
with), and trial-scored: the station's good references (the state's `good/` folder) must all score
below the new threshold, and the last flagged parts are scored and reported. Only then is the staged
folder moved into `deploy/packs/` and the runtime's pack, state and scorer swapped in one assignment.

`deploy/active.json` records the active and the previous pack (and state); the runtime starts from its
active entry and falls back to the previous one when the active one does not load (`start_models`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge.errors import EdgeError
from edge.pack import MANIFEST, load_pack, sha256_file
from edge.station.state import GOOD_DIR, STATE_FILE, check_state_matches_pack, load_state

RECORD = "active.json"
MAX_DOWNLOAD_BYTES = 4 << 30
DOWNLOAD_TIMEOUT_S = 60.0
FLAGGED_PARTS = 20  # the last flagged parts scored with the new pack (reported, not a gate)


class DeployError(EdgeError):
    """A deployment refused; the running pack is untouched. `step` names where it stopped."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


def deploy_dir(storage_dir) -> Path:
    return Path(storage_dir) / "deploy"


def read_record(storage_dir) -> dict | None:
    path = deploy_dir(storage_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise EdgeError(f"{path}: not JSON ({e}); remove it to start from the configured pack") from None
    if not isinstance(record, dict) or not isinstance(record.get("active"), dict):
        raise EdgeError(f"{path}: expected an object with an 'active' entry")
    return record


def write_record(storage_dir, record: dict) -> None:
    path = deploy_dir(storage_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RECORD + ".part")
    tmp.write_text(json.dumps(record, indent=2))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def entry_for(pack, state_root) -> dict:
    return {"pack": str(pack.root), "state": str(state_root), "model_id": pack.model_id,
            "pack_sha256": pack.manifest_sha256,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def start_models(config, load_models):
    """(config, models, note) for a station starting: the record's active pack and state when there is a
    record, else the configured ones. When the active entry does not load, the previous one is tried and
    becomes active (the failed one is kept in the record as `failed`, with the reason)."""
    record = read_record(config.storage.dir)
    if record is None:
        return config, load_models(config), None
    active = record["active"]
    try:
        chosen = config.model_copy(update={"pack": Path(active["pack"]), "state": Path(active["state"])})
        return chosen, load_models(chosen), None
    except Exception as e:
        previous = record.get("previous")
        if not previous:
            raise EdgeError(f"deployed pack {active.get('model_id')} at {active['pack']} does not load and there is "
                            f"no previous pack to fall back to: {e}") from e
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, EdgeError) else str(e)
        chosen = config.model_copy(update={"pack": Path(previous["pack"]), "state": Path(previous["state"])})
        try:
            models = load_models(chosen)
        except Exception as e2:
            raise EdgeError(f"deployed pack {active.get('model_id')} at {active['pack']} does not load ({reason[:500]}), "
                            f"nor does the previous one {previous.get('model_id')} at {previous['pack']} ({e2}); "
                            f"remove {deploy_dir(config.storage.dir) / RECORD} to start on the configured pack") from e2
        write_record(config.storage.dir, {"active": previous, "previous": None,
                                          "failed": {**active, "error": reason[:2000]}})
        note = (f"deployed pack {active.get('model_id')} ({active['pack']}) failed at start ({reason[:500]}); "
                f"started on the previous pack {previous.get('model_id')}")
        return chosen, models, note


def keep_deployed(new_config, running_config):
    """A config file re-read (reload) keeps the deployed pack and state while a deployment record exists:
    the file still names the pack the station was set up with."""
    if read_record(running_config.storage.dir) is None:
        return new_config
    return new_config.model_copy(update={"pack": running_config.pack, "state": running_config.state})


# -- fetching ---------------------------------------------------------------------------------

_HEX = re.compile(r"^[0-9a-f]{64}$")


def _is_archive(name: str) -> bool:
    return name.endswith(".tar.gz") or name.endswith(".tgz")


def _download(url: str, dest: Path, max_bytes: int, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) > max_bytes:
                raise DeployError("download", f"{url}: {declared} bytes is over the {max_bytes}-byte limit")
            got = 0
            with open(dest, "wb") as f:
                while block := response.read(1 << 20):
                    got += len(block)
                    if got > max_bytes:
                        raise DeployError("download", f"{url}: over the {max_bytes}-byte limit after {got} bytes")
                    f.write(block)
            if declared is not None and got != int(declared):
                raise DeployError("download", f"{url}: stopped after {got} of {declared} bytes")
    except DeployError:
        raise
    except Exception as e:  # URLError, HTTPError, IncompleteRead, timeouts, resets
        raise DeployError("download", f"{url}: download failed: {type(e).__name__}: {e}") from None


def _extract(archive: Path, into: Path, where: str) -> Path:
    """The unpacked folder: the archive's single top-level folder, or the archive root when it has more."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(into, filter="data")  # no absolute paths, no '..', no devices or links out
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DeployError("unpack", f"{where}: not a readable .tar.gz archive: {type(e).__name__}: {e}") from None
    entries = [p for p in into.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return into


def fetch(source: str, sha256: str, staging: Path, marker: str, what: str,
          max_bytes: int = MAX_DOWNLOAD_BYTES, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Copy or download `source` into `staging` and check its hash; returns the staged folder.
    `marker` is the file whose sha256 a folder is named by (pack.yaml, state.yaml)."""
    sha256 = sha256.lower()
    if not _HEX.match(sha256):
        raise DeployError("fetch", f"{what}: sha256 {sha256!r} is not 64 hex digits")
    staging.mkdir(parents=True, exist_ok=True)
    if source.startswith(("http://", "https://")):
        if not _is_archive(source.split("?", 1)[0]):
            raise DeployError("fetch", f"{what}: {source}: a URL must name a .tar.gz archive of the folder")
        archive = staging / "download.tar.gz"
        _download(source, archive, max_bytes, timeout_s)
        actual = sha256_file(archive)
        if actual != sha256:
            raise DeployError("verify", f"{what}: sha256 of {source} is {actual}, the command says {sha256}")
        folder = _extract(archive, staging / "unpacked", source)
        archive.unlink()
        return folder
    path = Path(source[len("file://"):] if source.startswith("file://") else source)
    if _is_archive(path.name):
        if not path.is_file():
            raise DeployError("fetch", f"{what}: {path}: no such archive")
        actual = sha256_file(path)
        if actual != sha256:
            raise DeployError("verify", f"{what}: sha256 of {path} is {actual}, the command says {sha256}")
        return _extract(path, staging / "unpacked", str(path))
    if not path.is_dir():
        raise DeployError("fetch", f"{what}: {path}: no such folder (give a folder, a .tar.gz, or an http(s) URL)")
    if not (path / marker).is_file():
        raise DeployError("fetch", f"{what}: {path / marker}: missing")
    folder = staging / "copy"
    shutil.copytree(path, folder)  # verified as copied: a later change to the source does not matter
    actual = sha256_file(folder / marker)
    if actual != sha256:
        raise DeployError("verify", f"{what}: sha256 of {path / marker} is {actual}, the command says {sha256}")
    return folder


# -- the deployment ---------------------------------------------------------------------------

def check_compatible(new_pack, running_pack, state, state_root) -> None:
    """A pack deployed without a new state must read frames as the running one does and match the state."""
    a, b = new_pack.input, running_pack.input
    if (a.height, a.width, a.colour, a.channels) != (b.height, b.width, b.colour, b.channels):
        raise DeployError("compatible", f"pack {new_pack.model_id} takes {a.height}x{a.width} {a.colour} input, the "
                          f"station's state was enrolled for {b.height}x{b.width} {b.colour} ({running_pack.model_id}); "
                          "send a state enrolled with the new pack as well")
    try:
        check_state_matches_pack(state, new_pack, state_root / STATE_FILE)
    except EdgeError as e:
        raise DeployError("compatible", f"{e}; send a state enrolled with the new pack as well") from None


def trial(scorer, state_root: Path, flagged: list[dict], read_image) -> dict:
    """Score the state's good references and the flagged parts. Rule: every reference must score below the
    new threshold (they are parts the station was told are good)."""
    good = sorted((state_root / GOOD_DIR).glob("*.png"))
    failing, scores = [], []
    for path in good:
        result = scorer.score([read_image(path)])[0]
        scores.append(result.score)
        if result.score >= result.threshold:
            failing.append({"file": path.name, "score": round(float(result.score), 6)})
    still = 0
    for row in flagged:
        result = scorer.score([read_image(row["files"]["image"])])[0]
        still += bool(result.anomalous)
    return {"threshold": round(float(scorer.threshold), 6), "references": len(good),
            "references_failing": failing, "max_reference_score": round(float(max(scores)), 6) if scores else None,
            "flagged_scored": len(flagged), "flagged_still_flagged": still}


def install(staged: Path, kind: str, storage_dir, digest: str) -> Path:
    """Move a verified staged folder to `deploy/<kind>/<digest16>` (a rename on the same disk)."""
    target = deploy_dir(storage_dir) / kind / digest[:16]
    if target.exists():
        return target  # the same content deployed before (content-addressed)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(target)
    return target


def new_staging(storage_dir) -> Path:
    """A fresh staging folder; called under the one-deployment lock, so what is left there is from a
    deployment a crash or a kill cut short, and goes."""
    root = deploy_dir(storage_dir) / "staging"
    if root.is_dir():
        for stale in root.iterdir():
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="deploy-", dir=root))


def digest_of(folder: Path, marker: str) -> str:
    return hashlib.sha256((folder / marker).read_bytes()).hexdigest()


_one_at_a_time = threading.Lock()


def _flagged_parts(store, n: int) -> list[dict]:
    rows = store.query(limit=n, verdict="anomalous")
    return [r for r in rows if r["files"].get("image") and Path(r["files"]["image"]).is_file()]


def _current_entry(rt) -> dict:
    record = read_record(rt.config.storage.dir)
    return record["active"] if record else entry_for(rt.pack, rt.config.state)


def run_deploy(rt, command, load_models, progress) -> dict:
    """Deploy as `command` (edge.line.commands.DeployCommand) asks; `progress(step, **fields)` after each step.
    Raises DeployError (with the step) and leaves the running pack, state and record as they were."""
    from edge.inference.preprocess import read_image

    if not _one_at_a_time.acquire(blocking=False):
        raise DeployError("queue", "another deployment or rollback is in progress; send it again when it replies")
    started = time.monotonic()
    storage = rt.config.storage.dir
    staging = new_staging(storage)
    installed: list[Path] = []
    try:
        if rt.scorer is None:
            raise DeployError("compatible", "the station is in learn mode (no state yet): deploy once it has one")
        state_before = rt.state
        progress("fetch", pack=command.pack)
        pack_dir = fetch(command.pack, command.sha256, staging / "pack", MANIFEST, "pack")
        progress("verified", sha256=command.sha256.lower())
        try:
            pack = load_pack(pack_dir)
        except EdgeError as e:
            raise DeployError("load", f"pack from {command.pack} does not load: {e}") from None
        progress("loaded", model_id=pack.model_id)
        if command.state is not None:
            state_dir = fetch(command.state, command.state_sha256, staging / "state", STATE_FILE, "state")
            try:
                load_state(state_dir, pack)
            except EdgeError as e:
                raise DeployError("compatible", f"state from {command.state}: {e}") from None
            progress("state_verified", state_sha256=command.state_sha256.lower())
        else:
            check_compatible(pack, rt.pack, rt.state, Path(rt.config.state))
            state_dir = None
        record = read_record(storage)
        keep = {str(Path(e["pack"])) for e in (record or {}).values() if isinstance(e, dict) and "pack" in e}
        keep |= {str(Path(e["state"])) for e in (record or {}).values() if isinstance(e, dict) and "state" in e}
        pack_root = install(pack_dir, "packs", storage, pack.manifest_sha256)
        if str(pack_root) not in keep:
            installed.append(pack_root)
        state_root = Path(rt.config.state)
        if state_dir is not None:
            state_root = install(state_dir, "states", storage, digest_of(state_dir, STATE_FILE))
            if str(state_root) not in keep:
                installed.append(state_root)
        candidate = rt.config.model_copy(update={"pack": pack_root, "state": state_root})
        try:
            models = load_models(candidate)
        except EdgeError as e:
            raise DeployError("load", f"pack {pack.model_id} with state {state_root}: {e}") from None
        progress("trial", references=len(list((Path(rt.config.state) / GOOD_DIR).glob("*.png"))))
        report = trial(models[3], Path(rt.config.state), _flagged_parts(rt.store, FLAGGED_PARTS), read_image)
        if report["references_failing"]:
            worst = max(report["references_failing"], key=lambda r: r["score"])
            raise DeployError("trial", f"pack {pack.model_id}: {len(report['references_failing'])} of "
                              f"{report['references']} good references score at or above its threshold "
                              f"{report['threshold']} (worst {worst['file']}: {worst['score']}); not switched")
        previous = _current_entry(rt)
        active = entry_for(models[0], state_root)
        try:
            rt.switch_models(candidate, models, expect_state=state_before)
        except EdgeError as e:
            raise DeployError("queue", str(e)) from None
        installed.clear()
        write_record(storage, {"active": active, "previous": previous})
        return {"step": "switched", "done": True, "model_id": active["model_id"], "pack_sha256": active["pack_sha256"],
                "pack_dir": active["pack"], "state": active["state"], "previous": previous, **report,
                "duration_s": round(time.monotonic() - started, 2)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in installed:  # installed for this attempt only, never switched to
            shutil.rmtree(folder, ignore_errors=True)
        _one_at_a_time.release()


def run_rollback(rt, load_models, progress) -> dict:
    """Back to the previous pack and state of the record; the current one becomes the previous."""
    if not _one_at_a_time.acquire(blocking=False):
        raise DeployError("queue", "a deployment or rollback is in progress; send it again when it replies")
    try:
        record = read_record(rt.config.storage.dir)
        if not record or not record.get("previous"):
            raise DeployError("rollback", "nothing to roll back to: no previous pack recorded in "
                              f"{deploy_dir(rt.config.storage.dir) / RECORD}")
        previous, current = record["previous"], record["active"]
        progress("load", model_id=previous.get("model_id"), pack=previous["pack"])
        candidate = rt.config.model_copy(update={"pack": Path(previous["pack"]), "state": Path(previous["state"])})
        try:
            models = load_models(candidate)
        except EdgeError as e:
            raise DeployError("load", f"previous pack {previous.get('model_id')} at {previous['pack']}: {e}") from None
        rt.switch_models(candidate, models)
        write_record(rt.config.storage.dir, {"active": previous, "previous": current})
        return {"step": "switched", "done": True, "model_id": previous.get("model_id"),
                "pack_sha256": previous.get("pack_sha256"), "pack_dir": previous["pack"], "previous": current}
    finally:
        _one_at_a_time.release()


def deploy_health(rt) -> dict:
    """What the status shows: the running pack's hash, the previous pack, the last deployment's outcome."""
    try:
        record = read_record(rt.config.storage.dir) or {}
    except EdgeError as e:
        record = {"error": str(e)}
    prev = record.get("previous")
    return {"pack": str(rt.pack.root), "pack_sha256": rt.pack.manifest_sha256,
            "previous": {k: prev.get(k) for k in ("model_id", "pack_sha256", "pack")} if prev else None,
            "failed": record.get("failed"), "note": getattr(rt, "deploy_note", None),
            "last": getattr(rt, "deploy_last", None)}
