"""`anomaly-edge export anomalygpt` on tiny random replicas of the three checkpoints (real key names and
file layouts), and the AnomalyGPT pack at run time: enrollment, calibration, scoring, the projector."""
import importlib.util
import json
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llama_cpp", reason="quantization needs llama-cpp-python (the llm extra)")
pytest.importorskip("gguf", reason="the GGUF writer needs gguf (the llm extra)")
pytest.importorskip("sentencepiece", reason="tokenizer.model needs sentencepiece (the export extra)")

import anomalygpt_replica as replica  # noqa: E402
from conftest import run_cli  # noqa: E402
from llama_reference import hf_llama_forward  # noqa: E402

from edge.scoring.anomalygpt import AnomalyGptExtractor, AnomalyGptScorer, Projector  # noqa: E402
from edge.scoring.bank import MemoryBank  # noqa: E402
from edge.errors import PackError  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.preprocess import read_image, to_batch  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402
from edge.station.state import load_state  # noqa: E402
from export.anomalygpt import export_anomalygpt  # noqa: E402
from export.anomalygpt import model as agpt  # noqa: E402
from export.anomalygpt.clip_tokenizer import ClipTokenizer  # noqa: E402
from export.anomalygpt.imagebind import SelfAttention, load_imagebind  # noqa: E402
from export.anomalygpt.vicuna import load_torch_file, lora_pairs, merge_lora, read_hf_llama  # noqa: E402
from export.assets import CLIP_BPE, fetch  # noqa: E402
from export.common import ExportError  # noqa: E402
from export.tensorrt import build_engine  # noqa: E402

CLASSES = "bottle,metal_nut"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return replica.write_all(tmp_path_factory.mktemp("anomalygpt") / "ckpt")


@pytest.fixture(scope="module")
def cli_export(ckpts, tmp_path_factory):
    """The pack as a user makes it: the console script, Q8_0."""
    out = tmp_path_factory.mktemp("packs") / "anomalygpt"
    proc = run_cli("export", "anomalygpt", "--imagebind", ckpts["imagebind"], "--delta", ckpts["delta"],
                   "--vicuna", ckpts["vicuna"], "--classes", CLASSES, "--quant", "Q8_0", "--out", out)
    return out, proc


@pytest.fixture(scope="module")
def pack(cli_export):
    return load_pack(cli_export[0])


@pytest.fixture(scope="module")
def f16_pack_dir(ckpts, tmp_path_factory):
    """F16 (no quantization), ONNX weights forced into external .data files."""
    return export_anomalygpt(tmp_path_factory.mktemp("packs") / "f16", ckpts["imagebind"], ckpts["delta"],
                             ckpts["vicuna"], CLASSES, quant="F16", onnx_single_file_limit=0)


@pytest.fixture(scope="module")
def torch_parts(ckpts):
    ib = load_imagebind(load_torch_file(ckpts["imagebind"], "ib"), "ib")
    delta = load_torch_file(ckpts["delta"], "delta")
    heads = agpt.load_heads(delta, "delta", ib.cfg.vision_width, ib.cfg.embed_dim, replica.N_EMBD)
    text = agpt.class_text_features(ib, ClipTokenizer(fetch(CLIP_BPE), ib.cfg.context_length), CLASSES.split(","))
    return ib, heads, text


def _onnx(path, feeds, names):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(names, feeds)


def test_export_reports_every_step_and_records_the_skipped_tensorrt_engine(cli_export, pack):
    _, proc = cli_export
    for i in range(1, 11):
        assert f"[{i}/10]" in proc.stderr
    assert "max abs error vs PyTorch" in proc.stderr and "written to" in proc.stderr
    m = pack.manifest
    assert set(m.files) == {"vision", "projector", "llm"}
    assert m.scorer.kind == "anomalygpt" and m.scorer.zero_shot.classes == ["bottle", "metal_nut"]
    assert m.encoder.feature_shape == (4 * replica.VISION_WIDTH, 16, 16) and m.scorer.bank_groups == 4
    assert m.llm.kind == "anomalygpt" and m.llm.n_embd == replica.N_EMBD and m.llm.n_prompt_embeddings == 18
    c = m.llm.conversation
    assert (c.human + c.image_open, c.image_close, c.assistant, c.stop) == ("### Human: <Img>", "</Img> ",
                                                                             "\n### Assistant:", ["###"])
    assert m.provenance["lora"] == {"rank": replica.LORA_R, "alpha": 32.0,
                                    "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert "tensorrt" in m.provenance["tensorrt"]["skipped"] and "skipped: " in proc.stderr


def test_attention_is_torch_multihead_attention_with_the_same_weights():
    mha = torch.nn.MultiheadAttention(32, 16).eval()  # ImageBind's blocks: sequence-first, 16 heads
    ours = SelfAttention(32, 16)
    ours.load_state_dict(mha.state_dict(), strict=True)
    x = torch.randn(3, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu_(1)
    for m in (None, mask):
        want = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=m, need_weights=False)[0]
        torch.testing.assert_close(ours(x, m), want.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_vision_onnx_matches_anomalygpts_per_class_computation(pack, torch_parts):
    ib, heads, text = torch_parts
    rng = np.random.default_rng(5)
    image = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    maps, embedding, tokens = _onnx(pack.file("vision"), {"image": image},
                                    ["anomaly_maps", "image_embedding", "patch_tokens"])
    with torch.no_grad():
        emb, tapped = ib.encode_image(torch.from_numpy(image), ib.cfg.default_taps())
        for k in range(2):  # AnomalyGPT's loop, one class (1 x 2 x D text features) at a time
            per_layer = []
            for fc, layer in zip(heads.image_decoder.fc, tapped):
                patch = fc(layer[:, 1:, :])
                patch = patch / patch.norm(dim=-1, keepdim=True)
                a = 100.0 * patch @ text[k:k + 1].transpose(-2, -1)
                a = F.interpolate(a.permute(0, 2, 1).view(2, 2, 16, 16), size=224, mode="bilinear", align_corners=True)
                per_layer.append(torch.softmax(a, dim=1)[:, 1])
            np.testing.assert_allclose(maps[:, k], torch.stack(per_layer).mean(0).numpy(), atol=1e-4)
        np.testing.assert_allclose(embedding, emb.numpy(), atol=1e-4)
        raw = torch.cat([F.normalize(t[:, 1:], dim=-1) for t in tapped], dim=-1)
        np.testing.assert_allclose(tokens.transpose(0, 2, 3, 1).reshape(2, 256, -1), raw.numpy(), atol=1e-4)
    assert maps.shape == (2, 2, 224, 224) and 0 <= maps.min() and maps.max() <= 1


def test_projector_onnx_matches_torch_and_puts_the_learned_prompts_first(pack, torch_parts):
    _, heads, _ = torch_parts
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((2, replica.EMBED_DIM)).astype(np.float32)
    amap = rng.uniform(0, 1, (2, 1, 224, 224)).astype(np.float32)
    image, prompts = _onnx(pack.file("projector"), {"image_embedding": emb, "anomaly_map": amap},
                           ["image_prompt", "anomaly_prompts"])
    with torch.no_grad():
        want_image = heads.llama_proj(torch.from_numpy(emb)).unsqueeze(1).numpy()
        grid = heads.prompt_learner.meta_net(torch.from_numpy(amap))
        want_grid = grid.reshape(2, replica.N_EMBD, 9).transpose(-2, -1).numpy()  # AnomalyGPT's reshape
    np.testing.assert_allclose(image, want_image, atol=1e-4)
    assert prompts.shape == (2, 18, replica.N_EMBD)
    np.testing.assert_allclose(prompts[:, :9], np.broadcast_to(heads.prompt_learner.base_prompts.detach().numpy(),
                                                               (2, 9, replica.N_EMBD)), atol=1e-6)
    np.testing.assert_allclose(prompts[:, 9:], want_grid, atol=1e-4)


def test_lora_merge_equals_the_adapted_layer(ckpts):
    config, tensors, _, _ = read_hf_llama(ckpts["vicuna"])
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    delta = load_torch_file(ckpts["delta"], "delta")
    merged, r = merge_lora(tensors, lora_pairs(delta, "delta", config["num_hidden_layers"]), alpha=32.0)
    assert r == replica.LORA_R
    x = torch.randn(5, replica.N_EMBD)
    for layer in range(replica.N_LAYERS):
        for p in "qkvo":
            name = f"model.layers.{layer}.self_attn.{p}_proj.weight"
            lora = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{p}_proj.lora_"
            a, b = delta[lora + "A.default.weight"].float(), delta[lora + "B.default.weight"].float()  # fp16 saved
            # peft's forward: base(x) + lora_B(lora_A(x)) * alpha / r
            want = x @ torch.from_numpy(tensors[name]).T + (x @ a.T @ b.T) * (32.0 / replica.LORA_R)
            torch.testing.assert_close(x @ torch.from_numpy(merged[name]).T, want, atol=1e-5, rtol=1e-5)
    assert all(np.array_equal(merged[k], tensors[k]) for k in tensors if "self_attn" not in k)


def test_f16_gguf_logits_match_the_merged_llama_reference(ckpts, f16_pack_dir):
    from llama_cpp import Llama

    config, tensors, _, _ = read_hf_llama(ckpts["vicuna"])
    delta = load_torch_file(ckpts["delta"], "delta")
    ref = {k: v.astype(np.float32) for k, v in tensors.items()}
    for layer in range(replica.N_LAYERS):
        for p in "qkvo":
            lora = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{p}_proj.lora_"
            b_a = (delta[lora + "B.default.weight"] @ delta[lora + "A.default.weight"]).numpy()
            name = f"model.layers.{layer}.self_attn.{p}_proj.weight"
            ref[name] = (ref[name] + b_a * (32.0 / replica.LORA_R)).astype(np.float16).astype(np.float32)
    config = {**config, "num_key_value_heads": config["num_attention_heads"]}
    llm = Llama(str(load_pack(f16_pack_dir).file("llm")), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        ids = [1] + [int(i) for i in np.random.default_rng(3).integers(3, 400, 24)]
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
    finally:
        llm.close()
    want = hf_llama_forward(ref, config, ids)
    scale = np.abs(want).max()
    # f16 weights and KV cache in llama.cpp: about 0.2 % here. A missing q/k permutation or LoRA is
    # off by the logits' own size (the unmerged base model: checked below).
    assert np.abs(got - want).max() < 0.01 * scale
    assert (got.argmax(1) == want.argmax(1)).all()
    base = hf_llama_forward({k: v.astype(np.float32) for k, v in tensors.items()}, config, ids)
    assert np.abs(got - base).max() > 0.3 * scale


def test_quantized_gguf_loads_with_the_vicuna_vocabulary(pack):
    from llama_cpp import Llama

    llm = Llama(str(pack.file("llm")), n_ctx=64, verbose=False, n_threads=1)
    try:
        assert llm.n_vocab() == 401 and llm.n_embd() == replica.N_EMBD  # 400 pieces + Vicuna's [PAD]
        assert llm.metadata["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
        assert llm.detokenize(llm.tokenize(b"### Human: <Img>", add_bos=False)).strip() == b"### Human: <Img>"
    finally:
        llm.close()


def test_external_onnx_data_is_listed_hashed_and_loads(f16_pack_dir, pack):
    f16 = load_pack(f16_pack_dir)
    assert f16.manifest.files["vision_data"].path == "vision.onnx.data"
    assert (f16_pack_dir / "projector.onnx.data").is_file()
    image = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    a = _onnx(f16.file("vision"), {"image": image}, ["anomaly_maps"])[0]
    b = _onnx(pack.file("vision"), {"image": image}, ["anomaly_maps"])[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    import onnx

    # The graph names its weights' digest (so the encoder sha256 follows the weights), whatever the layout.
    props = [{p.key: p.value for p in onnx.load(str(x.file("vision")), load_external_data=False).metadata_props}
             for x in (f16, pack)]
    assert len(props[0]["weights_sha256"]) == 64 and props[0] == props[1]


def test_grouped_bank_averages_each_layers_nearest_distance():
    rng = np.random.default_rng(0)
    bank_rows, queries = rng.standard_normal((300, 12)).astype(np.float32), rng.standard_normal((40, 12)).astype(np.float32)
    got = MemoryBank(bank_rows, groups=3).nearest_sqdist(queries, block_elements=1000)
    d = ((queries[:, None, :] - bank_rows[None]) ** 2).reshape(40, 300, 3, 4).sum(-1)  # per group
    np.testing.assert_allclose(got, d.min(axis=1).mean(axis=1), rtol=1e-4, atol=1e-4)


def test_few_shot_map_is_anomalygpts_one_minus_max_cosine(pack, torch_parts, synthetic_dataset):
    ib, _, _ = torch_parts
    good = sorted((synthetic_dataset / "train" / "good").iterdir())[:2]
    query = synthetic_dataset / "test" / "hole" / "000.png"
    refs = [read_image(p) for p in good]
    state = build_state(pack, refs, AnomalyGptExtractor(pack), quiet=True)
    assert len(state.bank) == 2 * 256 and state.calibration.threshold > 0
    result = AnomalyGptScorer(pack, state.bank, state.calibration.threshold).score_one(read_image(query))
    with torch.no_grad():
        taps = ib.cfg.default_taps()
        _, q = ib.encode_image(torch.from_numpy(to_batch([read_image(query)], pack.input)), taps)
        _, n = ib.encode_image(torch.from_numpy(to_batch(refs, pack.input)), taps)
        sims = []
        for ql, nl in zip(q, n):  # AnomalyGPT's extract_multimodal_feature, k references
            cos = F.cosine_similarity(ql[0, 1:].view(256, 1, -1), nl[:, 1:].reshape(1, -1, nl.shape[-1]), dim=2)
            sims.append(cos.max(dim=1).values)
        sim = F.interpolate(torch.stack(sims).mean(0).reshape(1, 1, 16, 16), size=224, mode="bilinear",
                            align_corners=True)
    np.testing.assert_allclose(result.anomaly_map, (1 - sim)[0, 0].numpy(), atol=1e-4)
    assert result.score == pytest.approx(result.anomaly_map.max(), abs=1e-6)  # AnomalyGPT's image score


def test_cli_enroll_then_score_on_the_anomalygpt_pack(cli_export, synthetic_dataset, tmp_path):
    pack_dir, _ = cli_export
    station = tmp_path / "station"
    proc = run_cli("enroll", "--pack", pack_dir, "--good", synthetic_dataset / "train" / "good", "--out", station,
                   "--shots", "4", "--quiet")
    assert "enrolled 4 good images" in proc.stdout
    state = load_state(station, load_pack(pack_dir))
    assert state.bank.groups == 4 and len(state.bank) == 4 * 256 and state.calibration.n_scores == 4
    proc = run_cli("score", "--pack", pack_dir, "--state", station, synthetic_dataset / "test" / "hole", "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 4 and all(r["threshold"] == pytest.approx(state.calibration.threshold, abs=1e-6) for r in rows)


def test_scorer_keeps_the_chosen_class_zero_shot_map_and_the_projector_reads_the_decision_map(pack, synthetic_dataset, tmp_path):
    good = [read_image(p) for p in sorted((synthetic_dataset / "train" / "good").iterdir())[:2]]
    state = build_state(pack, good, AnomalyGptExtractor(pack), quiet=True)
    state.save(tmp_path / "s")
    scorer = build_scorer(pack, load_state(tmp_path / "s", pack))
    assert isinstance(scorer, AnomalyGptScorer) and scorer.class_name == "bottle"
    frame = read_image(synthetic_dataset / "test" / "scratch" / "000.png")
    nut = AnomalyGptScorer(pack, state.bank, 0.5, class_name="metal_nut").score_one(frame)
    maps = AnomalyGptExtractor(pack).run([frame]).zero_shot_maps[0]
    np.testing.assert_allclose(nut.zero_shot_map, maps[1], atol=1e-6)
    np.testing.assert_allclose(scorer.score_one(frame).zero_shot_map, maps[0], atol=1e-6)
    with pytest.raises(PackError, match="class 'screw' was not exported into this pack .*bottle, metal_nut"):
        AnomalyGptScorer(pack, state.bank, 0.5, class_name="screw")

    image_row, prompt_rows = Projector(pack).embeddings(nut)
    assert image_row.shape == (1, replica.N_EMBD) and prompt_rows.shape == (18, replica.N_EMBD)
    image, prompts = _onnx(pack.file("projector"), {"image_embedding": nut.image_embedding[None],
                                                    "anomaly_map": nut.anomaly_map[None, None]},
                           ["image_prompt", "anomaly_prompts"])
    np.testing.assert_allclose(image_row, image[0], atol=1e-6)
    np.testing.assert_allclose(prompt_rows, prompts[0], atol=1e-6)
    assert not np.allclose(prompt_rows[9:], Projector(pack).run(nut.image_embedding[None], nut.zero_shot_map[None])[1][0][9:])

def _export_error(ckpts, tmp_path, **change):
    args = {"imagebind": ckpts["imagebind"], "delta": ckpts["delta"], "vicuna": ckpts["vicuna"], "classes": CLASSES}
    args.update(change)
    with pytest.raises(ExportError) as e:
        export_anomalygpt(tmp_path / "p", quant="F16", **args)
    assert not (tmp_path / "p").exists()
    return str(e.value)


def test_bad_checkpoints_are_refused_naming_the_file_and_key(ckpts, tmp_path):
    state = torch.load(ckpts["imagebind"], weights_only=True)
    del state["modality_trunks.vision.blocks.2.mlp.fc1.weight"]
    torch.save(state, tmp_path / "ib.pth")
    msg = _export_error(ckpts, tmp_path, imagebind=tmp_path / "ib.pth")
    assert "ib.pth" in msg and "modality_trunks.vision.blocks.2.mlp.fc1.weight" in msg

    replica.write_delta(tmp_path / "no_proj.pt", drop=("llama_proj.bias",))
    msg = _export_error(ckpts, tmp_path, delta=tmp_path / "no_proj.pt")
    assert "no_proj.pt: key 'llama_proj.bias' is missing" in msg

    replica.write_delta(tmp_path / "wide.pt", n_embd=2 * replica.N_EMBD)
    msg = _export_error(ckpts, tmp_path, delta=tmp_path / "wide.pt")
    assert "wide.pt" in msg and "has shape" in msg and f"LLM width {replica.N_EMBD}" in msg

    lora = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    replica.write_delta(tmp_path / "no_lora.pt", drop=(lora,))
    msg = _export_error(ckpts, tmp_path, delta=tmp_path / "no_lora.pt")
    assert "no_lora.pt" in msg and "lora_A.default.weight' has no matching lora_B" in msg

    import shutil

    vicuna = tmp_path / "vicuna"
    shutil.copytree(ckpts["vicuna"], vicuna)
    config = json.loads((vicuna / "config.json").read_text())
    del config["hidden_size"]
    (vicuna / "config.json").write_text(json.dumps(config))
    assert f"{vicuna / 'config.json'}: hidden_size missing" in _export_error(ckpts, tmp_path, vicuna=vicuna)

    msg = _export_error(ckpts, tmp_path, delta=tmp_path / "absent.pt")
    assert "absent.pt: AnomalyGPT delta checkpoint not found" in msg
    assert "--classes: 'bottle;drop' is not a class name" in _export_error(ckpts, tmp_path, classes="bottle;drop,x")


def test_cli_refuses_a_vicuna_folder_without_tokenizer_model(ckpts, tmp_path):
    import shutil

    vicuna = tmp_path / "vicuna"
    shutil.copytree(ckpts["vicuna"], vicuna)
    (vicuna / "tokenizer.model").unlink()
    proc = run_cli("export", "anomalygpt", "--imagebind", ckpts["imagebind"], "--delta", ckpts["delta"],
                   "--vicuna", vicuna, "--classes", "bottle", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and f"{vicuna / 'tokenizer.model'}: missing" in proc.stderr
    assert not (tmp_path / "p").exists()
    proc = run_cli("export", "anomalygpt", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "needs --imagebind, --delta, --vicuna, --classes" in proc.stderr


def test_tensorrt_step_runs_trtexec_with_the_batch_profile_and_records_it(tmp_path, monkeypatch):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("the tensorrt package is installed: the Python API path runs instead of trtexec")
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    # Says its version on --help as TensorRT 10.8's does; records its arguments and writes the engine file
    # where asked (what trtexec does on success).
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = --help ]; then echo '&&&& RUNNING TensorRT.trtexec [TensorRT v100800]'; exit 0; fi\n"
                    "echo \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "for a in \"$@\"; do case $a in --saveEngine=*) echo plan > \"${a#--saveEngine=}\";; esac; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    info = build_engine(tmp_path / "vision.onnx", tmp_path / "vision.plan", {"image": (3, 224, 224)}, batch=(1, 2, 8))
    args = (fake.parent / "args").read_text()
    assert "--minShapes=image:1x3x224x224" in args and "--maxShapes=image:8x3x224x224" in args and "--fp16" in args
    assert info["precision"] == "fp16" and info["batch"] == [1, 2, 8] and (tmp_path / "vision.plan").is_file()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "trtexec is not on PATH" in build_engine(tmp_path / "vision.onnx", tmp_path / "x.plan", {"image": (3, 8, 8)})["skipped"]


def test_several_delta_files_load_in_order_like_pandagpt_then_anomalygpt(ckpts, tmp_path):
    heads_only = [k for k in replica.delta_shapes() if k.startswith(("image_decoder.", "prompt_learner."))]
    panda = replica.write_delta(tmp_path / "pandagpt.pt", seed=7, drop=tuple(heads_only))
    replica.write_delta(tmp_path / "anomalygpt.pt", seed=1, drop=("llama_proj.weight", "llama_proj.bias"),
                        saved_as="tensors")  # plain tensors here, the trainer's Parameters in the other
    out = export_anomalygpt(tmp_path / "p", ckpts["imagebind"], [tmp_path / "pandagpt.pt", tmp_path / "anomalygpt.pt"],
                            ckpts["vicuna"], "bottle", quant="F16")
    emb = np.random.default_rng(0).standard_normal((1, replica.EMBED_DIM)).astype(np.float32)
    image = _onnx(out / "projector.onnx", {"image_embedding": emb, "anomaly_map": np.zeros((1, 1, 224, 224), np.float32)},
                  ["image_prompt"])[0]
    want = emb @ panda["llama_proj.weight"].numpy().T + panda["llama_proj.bias"].numpy()
    np.testing.assert_allclose(image[:, 0], want, atol=1e-5)
    assert [d["file"] for d in load_pack(out).manifest.provenance["delta"]] == ["pandagpt.pt", "anomalygpt.pt"]


def test_default_q4_k_m_quantization_loads(f16_pack_dir, tmp_path):
    """Quantized and decoded in child processes: a llama.cpp build that does not fit this CPU fails the
    test naming the signal instead of killing the test run."""
    from llm_child import decode_in_child, quantize_in_child

    out = quantize_in_child(f16_pack_dir / "llm.gguf", tmp_path / "q4.gguf")
    assert out.stat().st_size < (f16_pack_dir / "llm.gguf").stat().st_size
    got = decode_in_child(out)
    assert got["file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert got["finite"] and got["generated"] >= 1


def test_vicuna_folder_in_safetensors_reads_like_the_bin_shards(ckpts, tmp_path):
    from safetensors.torch import save_file

    config, tensors, _, files = read_hf_llama(ckpts["vicuna"])
    folder = tmp_path / "vicuna-st"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (folder / name).write_bytes((ckpts["vicuna"] / name).read_bytes())
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config2, tensors2, _, files2 = read_hf_llama(folder)
    assert config2 == config and [f.name for f in files2] == ["model.safetensors"] and len(files) == 2
    assert tensors2.keys() == tensors.keys() and all(np.array_equal(tensors2[k], tensors[k]) for k in tensors)
