"""GGUF export (`compact prune --gguf`, `compact export`): pruned models that transformers' GGUF reader (and so
llama.cpp's format) loads back with the same logits, up to the written type's rounding, and the same token ids."""
import json

import numpy as np
import pytest
import torch

from compact import cli, demo, demo_text, export, loading
from kernel_ops.tolerances import assert_close, decoder_rtol

gguf = pytest.importorskip("gguf")


def held_out_paragraphs(text: str, count: int = 40) -> list[str]:
    """`count` paragraphs from the end of `text` (blank-line separated), never the calibration part."""
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    return paragraphs[-count:]


def rounded(model, outtype: str):
    """`model` with every matrix rounded as GGUF `outtype` stores it (1-D tensors stay float32)."""
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and qtype != gguf.GGMLQuantizationType.F32:
                data = p.detach().float().numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
                p.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(p.shape)))
    return model


def check_roundtrip(folder, outtype: str, paragraphs: list[str]) -> None:
    """The GGUF in `folder` loads with transformers: its logits equal the safetensors checkpoint's with the
    matrices rounded as the file stores them, and its tokenizer encodes `paragraphs` to the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = export.gguf_path(folder, outtype).name
    pruned_tok = AutoTokenizer.from_pretrained(folder)
    with loading._one_gguf_reader():  # transformers' reader, parsing the file once instead of four times
        gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    for text in paragraphs:
        want = pruned_tok(text, add_special_tokens=False).input_ids
        assert gguf_tok(text, add_special_tokens=False).input_ids == want, f"{outtype}: ids differ on {text[:60]!r}"
    reference = rounded(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), outtype)
    ids = torch.tensor([pruned_tok(paragraphs[0], add_special_tokens=False).input_ids[:48]])
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    # the same weights through the same network: only float32 rounding of differently laid-out products differs
    rtol = decoder_rtol(reference.config, ids.shape[1])
    assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), what=f"{outtype} logits")


def metadata(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if len(field.data) == 1:
            value = field.parts[field.data[0]]
            out[key] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]
    return out


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer, its calibration text and held-out paragraphs."""
    root = tmp_path_factory.mktemp("export")
    texts = demo_text.stories(300, seed=1)
    tokenizer = demo.train_tokenizer(texts[:200])
    model = demo.build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text("\f".join(texts[200:260]))
    return root, texts[260:300]


def test_byte_level_bpe_prune_to_gguf_f32_and_q8_0(byte_level, tmp_path):
    root, paragraphs = byte_level
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(root / "model"), "--out", str(out), "--vocab-keep", "400", "--ffn-keep", "256ch",
                     "--calib", str(root / "calib.txt"), "--seq-len", "128", "--gguf", "f32", "--quiet"]) == 0
    check_roundtrip(out, "f32", paragraphs)
    assert cli.main(["export", str(out), "--gguf", "q8_0", "--quiet"]) == 0
    check_roundtrip(out, "q8_0", paragraphs)
    meta = metadata(export.gguf_path(out, "f32"))
    report = json.loads((out / "compact_report.json").read_text())
    assert meta["general.architecture"] == "llama" and meta["llama.feed_forward_length"] == 256
    assert meta["llama.vocab_size"] == len(report["kept_token_ids"]) and meta["llama.context_length"] == demo.SEQ_LEN
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    # an existing file is kept unless asked
    assert cli.main(["export", str(out), "--gguf", "q8_0", "--quiet"]) == 2


def test_qwen2_untied_to_gguf_f16(byte_level, tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root, paragraphs = byte_level
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(tmp_path / "qwen"), "--out", str(out), "--vocab-keep", "500", "--ffn-keep", "64ch",
                     "--calib", str(root / "calib.txt"), "--seq-len", "128", "--gguf", "--quiet"]) == 0
    check_roundtrip(out, "f16", paragraphs)
    meta = metadata(export.gguf_path(out, "f16"))
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.feed_forward_length"] == 64


def test_sentencepiece_llama2_tokenizer_to_gguf(shared_data, tmp_path):
    """The Llama 2 / Mistral 7B v0.1 SentencePiece vocabulary (byte fallback), cut to 6,000 tokens by frequency."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compact.loading import load_tokenizer

    tokenizer = load_tokenizer(str(shared_data / "llama2-tokenizer.model"))
    tokenizer.add_bos_token = True  # as Llama 2 ships it (the GGUF must say so: the byte-level case says False)
    text = (shared_data / "sotu.txt").read_text(encoding="utf-8")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(text[:200_000], encoding="utf-8")
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(tmp_path / "model"), "--out", str(out), "--vocab-keep", "6000", "--ffn-keep",
                     "32ch", "--calib", str(tmp_path / "calib.txt"), "--seq-len", "256", "--samples", "4",
                     "--gguf", "f16", "--quiet"]) == 0
    check_roundtrip(out, "f16", held_out_paragraphs(text))
    meta = metadata(export.gguf_path(out, "f16"))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    # llama.cpp's SentencePiece tokenizer merges the best-scored pair first (transformers reads the merges
    # instead): the scores must rank the merged tokens in the cut tokenizer's merge order
    reader = gguf.GGUFReader(str(export.gguf_path(out, "f16")))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    field = reader.fields["tokenizer.ggml.scores"]
    scores = dict(zip(tokens, (float(field.parts[i][0]) for i in field.data)))
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    made = dict.fromkeys("".join(m.split(" ") if isinstance(m, str) else m) for m in merges)  # first merge each
    ranked = [scores[token] for token in made]
    assert len(ranked) > 1000 and all(a > b for a, b in zip(ranked, ranked[1:]))


def test_what_export_cannot_write_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import tiny_models

    tiny_models.build("gemma").save_pretrained(tmp_path / "gemma")
    capsys.readouterr()  # (transformers' own progress bar, when nothing before disabled it)
    assert cli.main(["prune", str(tmp_path / "gemma"), "--out", str(tmp_path / "o"), "--ffn-keep", "24ch",
                     "--ffn-criterion", "magnitude", "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "GGUF export supports the llama, mistral, qwen2, qwen3 model types" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert cli.main(["export", str(tmp_path / "gemma")]) == 2
    assert "pip install 'compact-kernels[gguf]'" in capsys.readouterr().err


def test_llama3_rope_scaling_writes_the_converters_factors():
    """Llama 3.1's rope scaling: llama.cpp reads per-frequency factors from a `rope_freqs` tensor: 1 for the
    highest frequencies (wavelengths under 8192/4), `factor` for the lowest (over 8192), a blend between."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    factors = export.rope_factors(config)
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert ((factors >= 1) & (factors <= 8)).all() and (factors.diff() >= 0).all()
    assert export.rope_factors(LlamaConfig()) is None


def test_the_source_tokenizer_identity_travels_through_the_report(byte_level, tmp_path):
    """A GGUF source's tokenizer.ggml.model/pre (Loaded.gguf_tokenizer) is recorded by the prune, kept by a second
    prune of the result, and written by the export, which --gguf-pre overrides."""
    from compact import pruning
    from compact.options import CalibOptions
    from compact.options import Method, Run

    root, _ = byte_level
    loaded = loading.load(str(root / "model"), dtype="float32", device="cpu")
    loaded.gguf_tokenizer = {"model": "gpt2", "pre": "smollm"}  # as _read_gguf sets it for a .gguf source
    quiet = Run(progress=False)
    pruning.prune(loaded, tmp_path / "once", Method(vocab_keep=500), CalibOptions(str(root / "calib.txt"), 4, 64),
                   quiet)
    again = loading.load(str(tmp_path / "once"), dtype="float32", device="cpu")
    pruning.prune(again, tmp_path / "twice", Method(vocab_keep=400), CalibOptions(str(root / "calib.txt"), 4, 64),
                   quiet)
    assert json.loads((tmp_path / "twice" / "compact_report.json").read_text())["gguf_tokenizer"]["pre"] == "smollm"
    assert metadata(export.export(tmp_path / "twice", "f32"))["tokenizer.ggml.pre"] == "smollm"
    assert metadata(export.export(tmp_path / "twice", "f32", pre="gpt-2"))["tokenizer.ggml.pre"] == "gpt-2"


def test_an_unnamed_pre_tokenizer_is_refused_before_pruning(byte_level, tmp_path, capsys):
    """A byte-level tokenizer whose split llama.cpp's names do not cover (digits split apart, as SmolLM2's own
    tokenizer.json does) is refused before any work, pointing at --gguf-pre; with it, the prune and export run."""
    root, _ = byte_level
    src = tmp_path / "src"
    src.mkdir()
    for f in (root / "model").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   spec["pre_tokenizer"]]}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    common = ["prune", str(src), "--out", str(tmp_path / "o"), "--vocab-keep", "400", "--gguf", "--quiet"]
    assert cli.main(common) == 2
    err = capsys.readouterr().err
    assert "name it with --gguf-pre" in err and err.count("\n") == 1 and not (tmp_path / "o").exists(), err
    assert cli.main([*common, "--gguf-pre", "smollm"]) == 0
    assert metadata(export.gguf_path(tmp_path / "o", "f16"))["tokenizer.ggml.pre"] == "smollm"


def test_export_overwrites_only_a_gguf_compact_wrote(byte_level, tmp_path, capsys):
    """--overwrite never replaces a file of the checkpoint (its weights, its config) or any file compact did not
    write; it replaces a GGUF compact wrote. A folder or a place in a missing folder is refused before any work."""
    root, _ = byte_level
    out = tmp_path / "o"
    assert cli.main(["prune", str(root / "model"), "--out", str(out), "--vocab-keep", "400", "--quiet"]) == 0
    own = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json")}
    export_ = ["export", str(out), "--gguf", "f32", "--quiet"]
    for name in own:
        assert cli.main([*export_, "--out", str(out / name), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is not a GGUF compact wrote" in err and err.count("\n") == 1, err
    assert {name: (out / name).read_bytes() for name in own} == own
    (tmp_path / "a-file").write_text("")
    for bad, words in ((out, "is a folder"), (tmp_path / "missing" / "m.gguf", "missing does not exist"),
                       (tmp_path / "a-file" / "m.gguf", "a-file is a file, not a folder")):
        assert cli.main([*export_, "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    for model, words in ((tmp_path / "nonexistent", "no such folder"), (out / "model.safetensors", "is a file"),
                         (tmp_path, "no config.json in this folder")):
        assert cli.main(["export", str(model), "--gguf", "f32"]) == 2
        err = capsys.readouterr().err
        assert words in err and "hub" not in err and err.count("\n") == 1, err
    assert cli.main(export_) == 0
    assert cli.main(export_) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert cli.main([*export_, "--overwrite"]) == 0
    assert metadata(export.gguf_path(out, "f32"))[export.WRITER_KEY]
    assert not list(out.glob(".*partial"))


def test_attention_biases_follow_their_rows_into_llamacpp_order(tmp_path):
    """A Llama-family model with attention biases: llama.cpp's rotary order permutes the q/k rows, and each bias
    entry must move with its row (transformers' GGUF reader drops llama biases, so a round trip cannot show it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path)
    written = {}
    writer = type("Writer", (), {"add_tensor": lambda self, name, data: written.__setitem__(name, data)})()
    export._tensors(writer, tmp_path, config, "f32")
    attention = model.model.layers[0].self_attn
    for proj, heads, short in ((attention.q_proj, 4, "attn_q"), (attention.k_proj, 2, "attn_k")):
        rows = proj.weight.shape[0]
        order = export._permute(torch.arange(rows).float().unsqueeze(1), heads).squeeze(1).long()
        assert sorted(order.tolist()) == list(range(rows)) and order.tolist() != list(range(rows))
        assert np.array_equal(written[f"blk.0.{short}.weight"], proj.weight.detach()[order].numpy())
        assert np.array_equal(written[f"blk.0.{short}.bias"], proj.bias.detach()[order].numpy()), short


def test_the_gguf_names_the_source_model_and_says_whether_it_adds_bos(byte_level, tmp_path):
    """The same prune into two folders writes the same GGUF bytes (general.name is the source model's, not the
    output folder's); a tokenizer that adds no BOS (this byte-level one) says so, where llama.cpp would otherwise
    take its own default."""
    root, _ = byte_level
    files = []
    for name in ("one", "two"):
        assert cli.main(["prune", str(root / "model"), "--out", str(tmp_path / name), "--vocab-keep", "400",
                         "--ffn-keep", "256ch", "--ffn-criterion", "magnitude", "--gguf", "f32", "--quiet"]) == 0
        files.append(export.gguf_path(tmp_path / name, "f32").read_bytes())
    assert files[0] == files[1]
    meta = metadata(export.gguf_path(tmp_path / "one", "f32"))
    assert meta["general.name"] == "model (pruned)"
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
