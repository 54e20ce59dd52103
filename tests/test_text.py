import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from avatarforcing import AvatarForcingError
from avatarforcing.text import (WAN_T5_FILE, LazyTextEncoder, TextEncoder, build_text_encoder,
                                transformers_to_wan_key, wan_t5_to_transformers)

WORDS = "a person talking to the camera woman man smiling speaking in front of studio light".split()


def save_tiny_tokenizer(folder):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def tiny_umt5():
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    return UMT5EncoderModel(cfg).eval()


def to_wan_layout(model):
    return {transformers_to_wan_key(k): v.clone() for k, v in model.state_dict().items()}


def wan_t5_reference(sd, ids, mask, num_heads, num_buckets=32, max_dist=128):
    """The original Wan T5Encoder forward (wan/modules/t5.py), written against original key names."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel):  # bidirectional relative position buckets
        nb = num_buckets // 2
        out = (rel > 0).long() * nb
        rel = rel.abs()
        exact = nb // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (nb - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=nb - 1))

    b, n = ids.shape
    x = sd["token_embedding.weight"][ids]
    rel = torch.arange(n)[None] - torch.arange(n)[:, None]
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(num_layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        bias = p("pos_embedding.embedding.weight")[bucket(rel)].permute(2, 0, 1)[None]  # [1, heads, n, n]
        bias = bias.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
        h = norm(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{c}.weight")).view(b, n, num_heads, -1) for c in "qkv")
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1), p("attn.o.weight"))
        h = norm(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return norm(x, sd["norm.weight"])


@pytest.fixture()
def wan_folder(tmp_path):
    model = tiny_umt5()
    torch.save(to_wan_layout(model), tmp_path / WAN_T5_FILE)
    save_tiny_tokenizer(tmp_path / "google" / "umt5-xxl")
    return tmp_path, model


def test_mapping_roundtrip_is_complete():
    model = tiny_umt5()
    converted, unknown = wan_t5_to_transformers(to_wan_layout(model))
    assert not unknown and set(converted) == set(model.state_dict())


def test_wan_checkpoint_loads_and_matches_original_forward(wan_folder):
    folder, model = wan_folder
    cfg = OmegaConf.create({"encoder": "umt5", "path": str(folder)})
    enc = build_text_encoder(cfg, text_dim=32, text_len=16, keep_loaded=True)
    prompts = ["a woman talking to the camera", "a  man &amp; smiling", "a woman talking to the camera"]
    emb = enc.encode(prompts)
    assert emb.shape == (3, 16, 32) and enc.loads == 1
    tokenizer = enc.encoder.tokenizer
    assert torch.equal(emb[0], emb[2])
    # prompt 0: 6 words + </s> = 7 real tokens, then zeros
    assert (emb[0, :7].abs().sum(-1) > 0).all() and (emb[0, 7:] == 0).all()
    # identical to the transformers model on the same tokens ...
    tok = tokenizer(["a woman talking to the camera"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**tok).last_hidden_state[0]
    assert torch.allclose(emb[0, :7], ref, atol=1e-6)
    # ... and to the original Wan forward, proving the key mapping (html unescaped, whitespace collapsed)
    tok = tokenizer(["a woman talking to the camera", "a man & smiling"], padding=True, return_tensors="pt")
    wan = wan_t5_reference(to_wan_layout(model), tok.input_ids, tok.attention_mask, num_heads=4)
    assert torch.allclose(emb[0, :7], wan[0], atol=1e-5)
    assert torch.allclose(emb[1, :5], wan[1, :5], atol=1e-5) and (emb[1, 5:] == 0).all()


def test_cache_avoids_recompute(wan_folder):
    folder, _ = wan_folder
    enc = TextEncoder.from_wan_checkpoint(folder / WAN_T5_FILE, folder / "google" / "umt5-xxl", text_len=16)
    calls = []
    enc.model.register_forward_hook(lambda *a: calls.append(1))
    a = enc.encode(["a person speaking"])
    b = enc.encode(["a person speaking", "a person speaking"])
    assert len(calls) == 1 and torch.equal(a[0], b[1])


def test_transformers_folder_and_truncation(tmp_path):
    model = tiny_umt5()
    model.save_pretrained(tmp_path / "t5")
    save_tiny_tokenizer(tmp_path / "t5")
    enc = build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(tmp_path / "t5")}), 32, text_len=4)
    emb = enc.encode(["a person talking to the camera in front of studio light"])
    assert emb.shape == (1, 4, 32) and (emb[0].abs().sum(-1) > 0).all()  # truncated to text_len


def test_none_backend():
    enc = build_text_encoder(OmegaConf.create({"encoder": "none", "path": None}), text_dim=24, text_len=8)
    emb = enc.encode(["anything", "else"])
    assert emb.shape == (2, 8, 24) and (emb == 0).all()
    assert enc.encode("one").shape == (1, 8, 24)


def test_errors(wan_folder, tmp_path):
    folder, model = wan_folder
    tok_dir = folder / "google" / "umt5-xxl"
    sd = to_wan_layout(model)
    sd.pop("blocks.1.attn.k.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(AvatarForcingError, match=r"broken\.pth.*blocks\.1\.attn\.k\.weight.*blocks\.0\.extra\.weight"):
        TextEncoder.from_wan_checkpoint(tmp_path / "broken.pth", tok_dir)
    sd = to_wan_layout(model)
    sd["blocks.1.attn.k.weight"] = torch.zeros(16, 32)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(AvatarForcingError, match="shapes"):
        TextEncoder.from_wan_checkpoint(tmp_path / "shape.pth", tok_dir)
    with pytest.raises(AvatarForcingError, match="not found"):
        TextEncoder.from_wan_checkpoint(tmp_path / "missing.pth", tok_dir)
    with pytest.raises(AvatarForcingError, match="tokenizer folder not found"):
        TextEncoder.from_wan_checkpoint(folder / WAN_T5_FILE, tmp_path / "no_tok")
    cfg = OmegaConf.create({"encoder": "umt5", "path": None})
    with pytest.raises(AvatarForcingError, match="text.path is not set"):
        build_text_encoder(cfg, 32)
    with pytest.raises(AvatarForcingError, match="does not match model.text_dim"):
        build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(folder)}), text_dim=4096)
    with pytest.raises(AvatarForcingError, match="holds no umT5"):
        build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(tmp_path / "empty")}), 32)


# ---- lazy loading and the prompt cache --------------------------------------------------------


def lazy(folder, cache_dir=None, **kw) -> LazyTextEncoder:
    cfg = OmegaConf.create({"encoder": "umt5", "path": str(folder), "cache_dir": None if cache_dir is None
                            else str(cache_dir), **kw})
    return build_text_encoder(cfg, text_dim=32, text_len=16)


def test_lazy_encoder_loads_only_on_a_miss_and_frees(wan_folder, tmp_path):
    folder, _ = wan_folder
    enc = lazy(folder, tmp_path / "cache")
    assert isinstance(enc, LazyTextEncoder) and enc.loads == 0 and enc.encoder is None   # nothing loaded yet
    a = enc.encode(["a person speaking", "a man smiling"])
    assert enc.loads == 1 and enc.encoder is None                                        # loaded once, freed
    b = enc.encode(["a man smiling", "a person speaking"])
    assert enc.loads == 1                                                                # second encode: no load
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    # the result equals the eager encoder's
    ref = TextEncoder.from_wan_checkpoint(folder / WAN_T5_FILE, folder / "google" / "umt5-xxl", text_len=16)
    assert torch.equal(a, ref.encode(["a person speaking", "a man smiling"]))


def test_prompt_cache_on_disk_is_shared_and_keyed_by_model(wan_folder, tmp_path):
    folder, _ = wan_folder
    cache = tmp_path / "cache"
    first = lazy(folder, cache)
    a = first.encode("a person speaking")
    assert first.cache_path("a person speaking").is_file() and len(list(cache.glob("*.pt"))) == 1
    second = lazy(folder, cache)                                  # a new encoder instance, same model
    assert torch.equal(second.encode("a person speaking"), a) and second.loads == 0
    # another model (other weights in another file) -> another key, encoded anew, other embeddings
    other = tmp_path / "other"
    torch.manual_seed(1)
    cfg = tiny_umt5().config
    torch.save(to_wan_layout(UMT5EncoderModel(cfg).eval()), tmp_path / "other.pth")
    save_tiny_tokenizer(other)
    third = build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(tmp_path / "other.pth"),
                                                 "tokenizer": str(other), "cache_dir": str(cache)}), 32, 16)
    assert third.cache_key("a person speaking") != first.cache_key("a person speaking")
    assert not torch.equal(third.encode("a person speaking"), a) and third.loads == 1
    # the same file rewritten (mtime / size change) is another model too
    key = first.cache_key("x")
    torch.save(to_wan_layout(tiny_umt5()) | {"extra": torch.zeros(3)}, folder / WAN_T5_FILE)
    assert lazy(folder, cache).cache_key("x") != key
    # text_len is part of the key
    assert build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(tmp_path / "other.pth"),
                                                "tokenizer": str(other)}), 32, 8).cache_key("x") != third.cache_key("x")


def test_corrupt_cache_file_is_reencoded_with_a_warning(wan_folder, tmp_path, caplog):
    folder, _ = wan_folder
    a = lazy(folder, tmp_path).encode("a person speaking")
    path = lazy(folder, tmp_path).cache_path("a person speaking")
    for junk in (b"not a torch file", None):
        if junk is None:                                           # a readable file with the wrong content
            torch.save({"key": "other", "embedding": torch.zeros(3, 32)}, path)
        else:
            path.write_bytes(junk)
        enc = lazy(folder, tmp_path)
        with caplog.at_level("WARNING", logger="avatarforcing.text"):
            b = enc.encode("a person speaking")
        assert "unreadable" in caplog.text and enc.loads == 1 and torch.equal(a, b)
        caplog.clear()
        assert lazy(folder, tmp_path).encode("a person speaking").equal(a)   # the file was rewritten


def test_lazy_encoder_options(wan_folder, tmp_path):
    folder, _ = wan_folder
    enc = lazy(folder, None, keep_loaded=True, device="cpu")
    enc.encode("a person speaking")
    enc.encode("a man smiling")                                   # a new prompt: the kept encoder, no reload
    assert enc.loads == 1 and enc.encoder is not None and enc.run_device().type == "cpu"
    assert not list(tmp_path.glob("**/*.pt"))                     # cache_dir null: no files
    enc.unload()
    assert enc.encoder is None
    with pytest.raises(AvatarForcingError, match="text.device"):
        lazy(folder, None, device="gpu0")
    empty = lazy(folder, None)
    assert empty.encode("").shape == (1, 16, 32)                  # the empty prompt: </s> only
    assert (empty.encode("")[0, 1:] == 0).all()


def test_umt5_in_bf16_matches_fp32(wan_folder):
    """The text encoder in the dtype GPU users run: bf16 embeddings close to fp32 (cosine > 0.99 per token)."""
    folder, _ = wan_folder
    prompts = ["a person talking", "studio light"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        enc = build_text_encoder(OmegaConf.create({"encoder": "umt5", "path": str(folder), "cache_dir": None}),
                                 text_dim=32, text_len=16, dtype=dtype)
        out[dtype] = enc.encode(prompts)
    assert out[torch.bfloat16].dtype == torch.bfloat16
    a, b = out[torch.bfloat16].float(), out[torch.float32]
    real = b.abs().sum(-1) > 0                                   # rows of real tokens (the rest are zero padding)
    assert torch.equal(real, a.abs().sum(-1) > 0)
    cos = torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1)
    assert cos.min() > 0.99, cos
