"""export.llama_gguf + edge.explain.llama_model/llama_engine on a tiny random Llama: the writer against a NumPy Hugging Face forward,
AnomalyGPT's embedding path against the token path, bad GGUFs and prompts."""
import threading

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="needs the llm extra (llama-cpp-python)")
pytest.importorskip("gguf", reason="needs the llm extra (gguf)")

from edge.explain.llama_engine import ContextOverflow, LlamaEngine  # noqa: E402
from edge.explain.llama_model import LlamaModel, LlmError  # noqa: E402
from export.llama_gguf import GgufExportError, tiny_random_llama, write_llama_gguf  # noqa: E402

from llama_reference import hf_llama_forward  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, tensors, config, vocab = tiny_random_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    model = LlamaModel(path)
    engine = LlamaEngine(model, n_ctx=256, n_threads=1, n_batch=32)
    yield model, engine, tensors, config, vocab
    engine.close()
    model.close()


def _ids(n, vocab, seed=1):
    return [1] + [int(i) for i in np.random.default_rng(seed).integers(3, len(vocab.tokens), n - 1)]


def test_written_gguf_computes_what_the_hugging_face_model_computes(tiny):
    model, engine, tensors, config, vocab = tiny
    assert model.n_embd == config["hidden_size"] and model.n_vocab == len(vocab.tokens)
    ids = _ids(40, vocab)
    want = hf_llama_forward(tensors, config, ids)[-1]
    got = engine.evaluate([ids])
    # f32 weights: only summation order differs; a missing or wrong q/k permutation is off by ~1
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max()
    assert np.argmax(got) == np.argmax(want)


def test_f16_gguf_is_close_to_the_f32_reference(tmp_path):
    path, tensors, config, vocab = tiny_random_llama(tmp_path / "tiny16.gguf", dtype="f16")
    assert path.stat().st_size < sum(t.nbytes for t in tensors.values()) * 0.6
    with LlamaModel(path) as model, LlamaEngine(model, n_ctx=64) as engine:
        ids = _ids(20, vocab)
        want = hf_llama_forward(tensors, config, ids)[-1]
        assert np.abs(engine.evaluate([ids]) - want).max() < 0.03 * np.abs(want).max()


def test_embedding_rows_equal_to_token_rows_give_the_token_path_exactly(tiny):
    model, engine, tensors, _, vocab = tiny
    table = tensors["model.embed_tokens.weight"]
    before, image, middle, prompts, after = (_ids(7, vocab, 2), _ids(9, vocab, 3)[1:], _ids(4, vocab, 4)[1:],
                                             _ids(19, vocab, 5)[1:], _ids(6, vocab, 6)[1:])
    as_embeddings = [before, table[image], middle, table[prompts], after]
    as_tokens = [before, image, middle, prompts, after]
    engine.reset()
    by_embeddings = engine.evaluate(as_embeddings)
    engine.reset()
    by_tokens = engine.evaluate(as_tokens)
    np.testing.assert_array_equal(by_embeddings, by_tokens)
    # One unsplit token prompt: batches differ, so only summation order may change
    engine.reset()
    flat = engine.evaluate([before + image + middle + prompts + after])
    np.testing.assert_allclose(by_embeddings, flat, rtol=0, atol=1e-4 * np.abs(flat).max())
    engine.reset()
    g_emb = engine.generate(as_embeddings, max_tokens=12)
    engine.reset()
    g_tok = engine.generate(as_tokens, max_tokens=12)
    assert g_emb.tokens == g_tok.tokens and len(g_emb.tokens) > 0


def test_follow_up_reuses_the_context_and_matches_a_fresh_decode(tiny):
    model, engine, *_, vocab = tiny
    first = _ids(30, vocab, 7)
    engine.reset()
    g1 = engine.generate([first], max_tokens=5)
    follow = first + g1.tokens + _ids(6, vocab, 8)[1:]
    g2 = engine.generate([follow], max_tokens=5)
    assert g2.n_decoded <= 6
    reused = engine.evaluate([follow])
    engine.reset()
    fresh = engine.evaluate([follow])
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4 * np.abs(fresh).max())


def test_streaming_stop_strings_and_limits(tiny):
    model, engine, *_, vocab = tiny
    ids = _ids(12, vocab, 9)
    engine.reset()
    full = engine.generate([ids], max_tokens=24)
    assert full.stop_reason in ("max_tokens", "end") and len(full.tokens) <= 24
    pieces = []
    streamed = engine.generate([ids], max_tokens=24, on_token=pieces.append)
    assert "".join(pieces) == streamed.text == full.text
    assert len(full.text) > 4
    stop = full.text[2:4]
    pieces.clear()
    cut = engine.generate([ids], max_tokens=24, stop=[stop], on_token=pieces.append)
    assert cut.stop_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert "".join(pieces) == cut.text  # no piece of the stop string was streamed
    cancel = threading.Event()
    cancel.set()
    assert engine.generate([ids], max_tokens=24, cancel=cancel).stop_reason == "cancelled"
    assert engine.generate([ids], max_tokens=24, time_limit_s=1e-9).stop_reason == "time"


def test_prompt_longer_than_the_context_is_refused_and_the_engine_goes_on(tiny):
    model, engine, *_, vocab = tiny
    with pytest.raises(ContextOverflow, match=r"prompt of 300 tokens does not fit the context of 256"):
        engine.generate([_ids(300, vocab)], max_tokens=4)
    assert len(engine.generate([_ids(10, vocab)], max_tokens=4).tokens) >= 0
    with pytest.raises(LlmError, match=r"embeddings of width 3.*n_embd 64"):
        engine.evaluate([np.zeros((2, 3), np.float32)])
    with pytest.raises(LlmError, match=r"token ids must be integers in 0\.\."):
        engine.evaluate([[1, model.n_vocab]])


def test_files_that_are_not_loadable_ggufs_are_named_in_the_error(tmp_path, tiny):
    model = tiny[0]
    with pytest.raises(LlmError, match=r"missing\.gguf: GGUF model file not found"):
        LlamaModel(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(LlmError, match=r"notes\.gguf: not a GGUF file"):
        LlamaModel(text)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model.path.read_bytes()[:60_000])
    with pytest.raises(LlmError, match=r"truncated\.gguf: llama\.cpp could not load this GGUF"):
        LlamaModel(truncated)


def test_writer_refuses_incomplete_checkpoints_naming_what_is_missing(tmp_path, tiny):
    _, _, tensors, config, vocab = tiny
    partial = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(GgufExportError, match=r"missing tensors.*blk\.1\.ffn_up\.weight"):
        write_llama_gguf(partial, config, vocab, tmp_path / "x.gguf")
    with pytest.raises(GgufExportError, match=r"vision_tower\.weight"):
        write_llama_gguf({**tensors, "vision_tower.weight": np.zeros(2)}, config, vocab, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_sentencepiece_vocabulary_tokenizes_in_llama_cpp_as_in_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="needs sentencepiece (export extra)")
    import io

    from export.llama_gguf import CONTROL, UNKNOWN, sentencepiece_vocab

    lines = ["### Human: <Img> Is there an anomaly in the image?",
             "### Assistant: Yes, there is a scratch in the upper-right of the part.",
             "The bottle has a crack near the neck.", "No, the surface looks normal."] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=360, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)  # as LLaMA's tokenizer.model
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    vocab = sentencepiece_vocab(tmp_path / "tokenizer.model")
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (1, 2, 0, None)
    assert vocab.token_types[0] == UNKNOWN and vocab.token_types[1] == CONTROL
    path, *_ = tiny_random_llama(tmp_path / "sp.gguf", vocab=vocab)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    with LlamaModel(path) as model:
        for text in ["### Human: <Img> Is there an anomaly?", "A dent, 2.5 mm wide — Ünïcode too", "</Img> "]:
            assert model.tokenize(text, add_bos=True) == [1] + sp.encode(text), text


def test_anomalygpt_prompt_with_token_rows_as_embeddings_is_the_token_prompt(tiny):
    from edge.pack import ConversationSpec
    from edge.explain.prompts import AnomalyGptPrompt

    model, engine, tensors, _, vocab = tiny
    table = tensors["model.embed_tokens.weight"]
    image_ids, prompt_ids = _ids(5, vocab, 10)[1:], _ids(19, vocab, 11)[1:]
    prompt = AnomalyGptPrompt(model, ConversationSpec(), n_prompt_embeddings=18)
    turns = [("Is there an anomaly in the image?", "Yes, a scratch.")]
    segs = prompt.segments(table[image_ids], table[prompt_ids], turns, "How big is it?")
    assert segs[0] == [model.bos] and segs[2].shape == (4, 64) and segs[4].shape == (18, 64)
    text = model.detokenize(segs[5])
    assert text.endswith("\n### Human: How big is it?\n### Assistant:") and "Yes, a scratch." in text
    as_tokens = [segs[0], segs[1], image_ids, segs[3], prompt_ids, segs[5]]
    engine.reset()
    by_embeddings = engine.evaluate(segs)
    engine.reset()
    np.testing.assert_array_equal(by_embeddings, engine.evaluate(as_tokens))
    with pytest.raises(LlmError, match=r"prompt embeddings have shape \(17, 64\); the pack says \(18, 64\)"):
        prompt.segments(table[image_ids], table[prompt_ids[:17]], [], "Is there an anomaly?")
