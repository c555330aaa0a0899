"""The console script as a user runs it: enroll, score, eval on a synthetic MVTec-layout folder."""
import json

import cv2

from conftest import run_cli


def test_eval_writes_metrics_json_report_and_images(default_pack_dir, synthetic_dataset, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", "--pack", default_pack_dir, "--data", synthetic_dataset, "--shots", "8",
                   "--json", out, "--quiet")
    result = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "balanced_accuracy", "f1", "false_reject_rate",
                "frames_per_second"):
        assert isinstance(result[key], float), key
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= result[key] <= 1.0
    # Synthetic defects are plain to see: the scorer must separate them.
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9
    assert result["shots"] == 8 and result["n_test"] == 8 + 4 * 4
    report = tmp_path / "eval-report"
    roc = cv2.imread(str(report / "roc.png"))
    assert roc is not None and roc.shape[0] > 100
    assert len(list(report.glob("overlay_*.png"))) >= 3
    assert "image AUROC" in (report / "summary.md").read_text()
    assert "| image AUROC |" in proc.stdout


def test_eval_skips_a_corrupt_test_image_and_scores_the_rest(default_pack_dir, synthetic_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    (data / "test" / "good" / "zzz_corrupt.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "e.json"
    proc = run_cli("eval", "--pack", default_pack_dir, "--data", data, "--shots", "4", "--json", out, "--quiet")
    result = json.loads(out.read_text())
    assert result["n_test"] == 24
    assert any("zzz_corrupt.png: not a readable image" in s for s in result["skipped"])
    assert "zzz_corrupt.png" in proc.stderr


def test_enroll_then_score_flags_the_defects(default_pack_dir, synthetic_dataset, tmp_path):
    state = tmp_path / "station"
    proc = run_cli("enroll", "--pack", default_pack_dir, "--good", synthetic_dataset / "train" / "good",
                   "--out", state, "--quiet")
    assert "threshold" in proc.stdout and (state / "state.yaml").is_file()
    assert "background masking: on" in proc.stdout  # synthetic parts lie on a plain belt
    assert "frames: squashed to 224x224" in proc.stdout  # square frames: nothing to keep
    assert len(list((state / "good").iterdir())) == 12
    frames = tmp_path / "frames"
    frames.mkdir()
    for kind in ("hole", "scratch"):
        src = synthetic_dataset / "test" / kind / "000.png"
        (frames / f"{kind}.png").write_bytes(src.read_bytes())
    goods = sorted((synthetic_dataset / "test" / "good").iterdir())
    for i, src in enumerate(goods):
        (frames / f"good{i}.png").write_bytes(src.read_bytes())
    (frames / "broken.png").write_bytes(b"nope")
    proc = run_cli("score", "--pack", default_pack_dir, "--state", state, frames, "--json",
                   "--overlays", tmp_path / "ov", check=False)
    assert proc.returncode == 1  # one file failed; the others were still scored
    assert "broken.png: not a readable image" in proc.stderr
    rows = {json.loads(line)["image"].split("/")[-1]: json.loads(line) for line in proc.stdout.splitlines()}
    # The threshold aims at 5% false rejects: of the 8 good parts at most one may be rejected.
    good_rows = [rows[f"good{i}.png"] for i in range(len(goods))]
    assert sum(r["verdict"] == "anomalous" for r in good_rows) <= 1
    assert rows["hole.png"]["verdict"] == "anomalous" and rows["scratch.png"]["verdict"] == "anomalous"
    assert rows["hole.png"]["regions"] and rows["hole.png"]["score"] > max(r["score"] for r in good_rows)
    assert len(list((tmp_path / "ov").glob("*_overlay.png"))) == 2 + len(goods)


def test_bad_arguments_get_clear_errors(default_pack_dir, tmp_path):
    proc = run_cli("eval", "--pack", default_pack_dir, "--data", tmp_path, "--shots", "zero", check=False)
    assert proc.returncode == 2 and "--shots must be a positive integer or 'all'" in proc.stderr
    proc = run_cli("eval", "--pack", default_pack_dir, "--data", tmp_path, check=False)
    assert proc.returncode == 2 and "not an MVTec-layout folder (missing train/good/)" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("enroll", "--pack", default_pack_dir, "--good", tmp_path / "empty", "--out", tmp_path / "s",
                   check=False)
    assert proc.returncode == 2 and "no images found" in proc.stderr
    proc = run_cli("enroll", "--pack", tmp_path / "nopack", "--good", tmp_path, "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2 and "model pack folder not found" in proc.stderr


def test_eval_without_masks_reports_pixel_metrics_as_null_and_one_class_is_refused(default_pack_dir,
                                                                                  synthetic_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    shutil.rmtree(data / "ground_truth")
    out = tmp_path / "e.json"
    run_cli("eval", "--pack", default_pack_dir, "--data", data, "--shots", "4", "--json", out, "--quiet")
    result = json.loads(out.read_text())
    assert result["pixel_auroc"] is None and result["aupro"] is None and result["image_auroc"] > 0.5
    for kind in ("hole", "scratch", "stain", "missing_chunk"):
        shutil.rmtree(data / "test" / kind)
    proc = run_cli("eval", "--pack", default_pack_dir, "--data", data, "--shots", "4", check=False)
    assert proc.returncode == 2 and "needs both good and defective readable images" in proc.stderr


def test_export_and_demo_bad_arguments_are_clear(default_pack_dir, tmp_path):
    proc = run_cli("export", "default", "--out", default_pack_dir, check=False)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("export", "default", "--out", tmp_path / "p", "--size", "0", check=False)
    assert proc.returncode == 2 and "expected a positive integer" in proc.stderr
    proc = run_cli("demo", "--pack", default_pack_dir, "--parts", "0", check=False)
    assert proc.returncode == 2 and "expected a positive integer" in proc.stderr


def test_a_pack_folder_given_as_the_state_says_so(default_pack_dir, tmp_path):
    import numpy as np

    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((64, 64), 128, np.uint8))
    proc = run_cli("score", "--pack", default_pack_dir, "--state", default_pack_dir, img, check=False)
    assert proc.returncode == 2
    assert "is a model pack, not a station state" in proc.stderr and "--out station" in proc.stderr


def test_score_of_cut_or_corrupt_images_prints_our_error_and_no_decoder_line(default_pack_dir, enrolled_state,
                                                                            synthetic_dataset, tmp_path):
    """libjpeg/libpng print to the process's stderr themselves; the technician must see only our line."""
    import numpy as np

    part = cv2.imread(str(synthetic_dataset / "test" / "good" / "000.png"))
    jpeg = cv2.imencode(".jpg", part)[1].tobytes()
    png = cv2.imencode(".png", part)[1].tobytes()
    (tmp_path / "whole.jpg").write_bytes(jpeg)
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    mid = len(jpeg) // 2  # a restart marker where libjpeg does not expect one: it guesses the rest
    (tmp_path / "scrambled.jpg").write_bytes(jpeg[:mid] + b"\xff\xd0" + jpeg[mid + 2:])
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    assert cv2.imdecode(np.frombuffer(jpeg[:mid] + b"\xff\xd0" + jpeg[mid + 2:], np.uint8), 1) is not None
    proc = run_cli("score", "--pack", default_pack_dir, "--state", enrolled_state, *(
        tmp_path / n for n in ("cut.jpg", "scrambled.jpg", "cut.png", "whole.jpg")), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "whole.jpg  score" in proc.stdout and "scrambled.jpg" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, proc.stderr
    assert "cut.jpg: not a readable image (truncated JPEG: no end-of-image marker" in errors[0]
    assert "scrambled.jpg: corrupt JPEG data, part of the picture is missing" in errors[1]
    assert "cut.png: not a readable image (truncated PNG: no IEND chunk" in errors[2]
    raw = [line for line in proc.stderr.splitlines()
           if line.startswith(("Corrupt JPEG", "Premature end", "libpng", "[ WARN", "[ERROR"))]
    assert raw == [], proc.stderr
