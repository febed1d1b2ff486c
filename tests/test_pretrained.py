"""pretrained.py against OpenAI's own code (the clip package, pip's clip-anytorch): the tokenizer's ids against
clip.tokenize, the letter / number / white-space classes against the `regex` module on every code point, and the
image and text towers against clip.model.CLIP (tiny random configurations) loaded from a plain state dict and
from a TorchScript archive. Nothing is downloaded."""

import gzip
import hashlib
import random
import re
import sys
import types
import warnings

import pytest
import torch

import common
import pretrained

OPENAI_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# a tiny CLIP in OpenAI's classes: embed_dim, image 32 px, 2 vision layers of width 128 (2 heads), patch 8;
# context 77, OpenAI's vocabulary, 2 text layers of width 128, 2 heads (OpenAI infers heads = width // 64)
TINY_CLIP = dict(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=2)
TEXTS = [
    "a photo of a dog", "Hello, World!!! ... (really?) [yes] {no} #1 @home $5 50% a+b=c", "snake_case_name __init__ a_b",
    "café naïve résumé Ελληνικά русский язык Ærøskøbing ẞtraße İstanbul", "日本語のテキスト 中文 한국어 ภาษาไทย हिन्दी العربية",
    "1234567 3.14 ١٢٣ ௧௨௩ ⅷ ½ ², 10,000", "😀 🎉👍🏽 emoji! 👨‍👩‍👧 ❤️", "don't I'm we've they're she'll he'd it's 'tis O'Neil",
    "multiple   spaces\n\nand\ttabs\n lines\u00a0no-break\u2003em", "  leading and trailing  ", "", "<|startoftext|> x <|endoftext|>",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;s &amp;amp;", "ſ'ſ l'ſa", "e\u0345x", "a photo of a cat " * 5,
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture(scope="module")
def clip():
    """OpenAI's clip package. Its clip.py imports `packaging` through setuptools' pkg_resources, which recent
    setuptools no longer ship: a stand-in provides it during the import when it is absent."""
    import packaging.version

    with pytest.MonkeyPatch.context() as patch:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            patch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(packaging=packaging))
        import clip
        import clip.model
    return clip


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenize_matches_openai(clip):
    import ftfy

    clean = [t for t in TEXTS if "&" not in t]
    assert all(ftfy.fix_text(t) == t for t in clean)  # texts ftfy leaves alone: ids must be equal
    ours, reference = pretrained.tokenize(TEXTS), clip.tokenize(TEXTS)
    assert ours.dtype == torch.int and ours.shape == (len(TEXTS), 77)  # OpenAI's dtype for torch >= 1.8
    assert torch.equal(ours.long(), reference)
    for text in TEXTS:  # one string, another context length
        ours = pretrained.tokenize(text, context_length=40, truncate=True)
        assert torch.equal(ours.long(), clip.tokenize(text, context_length=40, truncate=True))
    assert pretrained.tokenize("a photo")[0, :4].tolist() == [49406, 320, 1125, 49407]


def test_truncation_and_too_long(clip):
    long_text = "a very long caption with many words " * 20
    ours = pretrained.tokenize([long_text, "short"], truncate=True)
    assert torch.equal(ours.long(), clip.tokenize([long_text, "short"], truncate=True))
    assert ours[0, -1].item() == 49407 and (ours[0] != 0).all()
    with pytest.raises(RuntimeError) as error:
        pretrained.tokenize(long_text)
    with pytest.raises(RuntimeError) as reference_error:
        clip.tokenize(long_text)
    assert str(error.value) == str(reference_error.value)
    assert torch.equal(pretrained.tokenize("a b c", context_length=4, truncate=True).long(),
                       clip.tokenize("a b c", context_length=4, truncate=True))


def test_random_texts_ftfy_leaves_alone_match_openai(clip):
    import ftfy

    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x530), (0x600, 0x700), (0x900, 0x980), (0xE00, 0xE80),
              (0x2000, 0x2070), (0x2150, 0x2190), (0x3040, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0x1F300, 0x1F650)]
    rng = random.Random(0)
    texts = []
    while len(texts) < 300:
        text = "".join(chr(rng.randrange(*rng.choice(blocks))) if rng.random() > 0.2 else rng.choice(" '\n_&;.1")
                       for _ in range(rng.randint(1, 25)))
        if ftfy.fix_text(text) == text:
            texts.append(text)
    assert torch.equal(pretrained.tokenize(texts, truncate=True).long(), clip.tokenize(texts, truncate=True))


def test_text_ftfy_repairs_may_differ(clip):
    """The documented difference: no ftfy.fix_text (here: the ligature it expands, a control character it drops,
    the third level of HTML escaping it decodes)."""
    for text in ("ﬁne", "a\x1cb", "&amp;amp;amp;"):
        assert not torch.equal(pretrained.tokenize(text).long(), clip.tokenize(text))


def all_code_points():
    """Every code point assigned in both Unicode versions in play (Python's unicodedata and the regex module's)."""
    import unicodedata

    import regex

    everything = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, sys.maxunicode + 1)))
    return "".join(c for c in regex.findall(r"\P{Cn}", everything) if unicodedata.category(c) != "Cn")


def test_unicode_classes_match_regex_on_every_code_point():
    import regex

    text = all_code_points()
    letters, numbers = pretrained.letter_and_number_classes()
    for ours, reference in ((f"[{letters}]+", r"\p{L}+"), (f"[{numbers}]+", r"\p{N}+"), (f"[{pretrained.WHITE_SPACE}]+", r"\s+")):
        assert "".join(re.findall(ours, text)) == "".join(regex.findall(reference, text)), reference


def test_split_pattern_matches_openai_pattern():
    """The whole pre-tokenizer, OpenAI's case-insensitive pattern, on lower-case text: each character probed
    next to a letter, a symbol, a digit and an apostrophe, which tells which alternative takes it."""
    import regex

    reference = regex.compile(OPENAI_SPLIT, regex.IGNORECASE)
    chars = all_code_points()
    sample = chars[:0x300] + chars[0x300::11] + "\u0345\u017f"  # all of Latin, every 11th beyond, the two quirks
    text = "".join(f"{c}a {c}% {c}1 '{c} '{c}e " for c in sample).lower()
    assert pretrained.split_pattern().findall(text) == reference.findall(text)
    assert pretrained.split_pattern().findall("i'ſ e\u0345x") == ["i", "'ſ", "e", "x"]  # regex's case folding


def write_merges(path, merges, trailing_newline=True):
    text = "#version: toy\n" + "\n".join(merges) + ("\n" if trailing_newline else "")
    with gzip.open(path, "wb") as file:
        file.write(text.encode("utf-8"))
    return str(path)


def test_toy_vocabulary(clip, tmp_path):
    from clip.simple_tokenizer import SimpleTokenizer

    merges = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>", "d o", "do g</w>", "l o</w>"]
    bare = write_merges(tmp_path / "toy.txt.gz", merges, trailing_newline=False)
    assert pretrained.vocab_size(bare) == 512 + len(merges) + 2
    # OpenAI's tokenizer reads the same file (without the final newline, which it would read as an empty merge)
    reference = SimpleTokenizer(bare)
    for text in ("hello cat", "a dog, a cat!", "hellooo 12"):
        ids = pretrained.tokenize(text, context_length=12, vocab=bare)[0]
        expected = [reference.encoder["<|startoftext|>"], *reference.encode(text), reference.encoder["<|endoftext|>"]]
        assert ids[:len(expected)].tolist() == expected and ids.max() < pretrained.vocab_size(bare)
    start, hello = 512 + len(merges), 512 + merges.index("hell o</w>")  # ids after the 512 byte symbols
    assert pretrained.tokenize("hello", vocab=bare)[0, :4].tolist() == [start, hello, start + 1, 0]
    with_newline = write_merges(tmp_path / "toy_newline.txt.gz", merges)
    assert torch.equal(pretrained.tokenize("hello cat", vocab=with_newline), pretrained.tokenize("hello cat", vocab=bare))
    assert pretrained.load_tokenizer(bare) is pretrained.load_tokenizer(bare)  # parsed once per file
    bad = write_merges(tmp_path / "bad.txt.gz", ["h e", "l l x"])
    with pytest.raises(common.UserError, match="line 3 is not a merge of two symbols"):
        pretrained.tokenize("hello", vocab=bad)


def test_vocabulary_sources(clip, tmp_path, monkeypatch):
    installed = pretrained.resolve_bpe_vocab()
    assert installed == pretrained.installed_bpe_vocab() and installed.startswith(clip.__path__[0])
    with open(installed, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == pretrained.BPE_VOCAB_SHA256
    assert pretrained.vocab_size() == 49408
    with pytest.raises(common.UserError, match="BPE vocabulary not found"):
        pretrained.tokenize("x", vocab=str(tmp_path / "missing.txt.gz"))
    # no clip package, nothing cached, offline: one line that says what to install or where to put the file
    cache = tmp_path / "cache" / pretrained.BPE_VOCAB_FILE
    monkeypatch.setattr(pretrained, "installed_bpe_vocab", lambda: None)
    monkeypatch.setattr(pretrained, "default_bpe_vocab_path", lambda: str(cache))
    with pytest.raises(common.UserError) as error:
        pretrained.vocab_size()
    message = str(error.value)
    assert "pip install clip-anytorch" in message and str(cache) in message and pretrained.BPE_VOCAB_URL in message
    assert "\n" not in message
    # online: the checksum goes to the download, the file lands in the cache
    seen = {}

    def download(url, dst, hash_prefix=None, progress=True):
        seen.update(url=url, hash=hash_prefix)
        with open(installed, "rb") as source, open(dst, "wb") as target:
            target.write(source.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert pretrained.resolve_bpe_vocab() == str(cache) and cache.is_file()
    assert seen == {"url": pretrained.BPE_VOCAB_URL, "hash": pretrained.BPE_VOCAB_SHA256}
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # cached: not fetched again
    assert pretrained.resolve_bpe_vocab() == str(cache)


# ------------------------------------------------------------------------------------------------
# the towers against clip.model.CLIP


@pytest.fixture(scope="module")
def tiny_clip(clip):
    """clip.model.CLIP with every parameter perturbed (LayerNorms and biases too), eval mode, float32."""
    torch.manual_seed(0)
    model = clip.model.CLIP(**TINY_CLIP).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def towers_from(model):
    state = model.state_dict()
    vision = pretrained.VisionTower(**pretrained.vision_config({k[7:]: v for k, v in state.items() if k.startswith("visual.")}))
    text = pretrained.TextTower(**pretrained.text_config(state))
    vision.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("visual.")})
    text.load_state_dict({k: v for k, v in state.items() if not k.startswith("visual.") and k != "logit_scale"})
    return vision.eval(), text.eval()


def openai_block_tokens(model, x, layers):
    """encode_image plus the tokens after the given blocks, CLS dropped, from forward hooks (OpenAI's transformer is
    sequence-first: [L, B, W])."""
    tokens, hooks = {}, []
    for k in layers:
        hooks.append(model.visual.transformer.resblocks[k].register_forward_hook(
            lambda module, args, out, k=k: tokens.__setitem__(k, out.permute(1, 0, 2)[:, 1:])))
    embedding = model.encode_image(x)
    for hook in hooks:
        hook.remove()
    return embedding, tokens


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_towers_match_openai_clip(clip, tiny_clip, monkeypatch, dtype):
    import copy

    if dtype == torch.float64:  # OpenAI's LayerNorm computes in float32 (for fp16 weights); plain LayerNorm in float64
        monkeypatch.setattr(clip.model.LayerNorm, "forward", torch.nn.LayerNorm.forward)
    model = copy.deepcopy(tiny_clip).to(dtype)
    vision, text = (tower.to(dtype) for tower in towers_from(model))
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    ids = pretrained.tokenize(["a photo of a cat", "Tom & Jerry <|endoftext|> twice", "", "an old oil painting " * 3])
    with torch.no_grad():
        expected, expected_tokens = openai_block_tokens(model, x, (0, 1))
        embedding, tokens = vision(x, return_layers=(0, 1))
        assert embedding.shape == (3, 16) and tokens[1].shape == (3, 16, 128)
        assert torch.allclose(embedding, expected, rtol=0, atol=tolerance)
        assert all(torch.allclose(tokens[k], expected_tokens[k], rtol=0, atol=tolerance) for k in (0, 1))
        features = text(ids)
        assert features.shape == (4, 16) and features.dtype == dtype
        assert torch.allclose(features, model.encode_text(ids), rtol=0, atol=tolerance)
        # a shorter context (clip-anytorch's encode_text takes the first L positions and the same causal mask)
        assert torch.allclose(text(ids[:, :12].long()), model.encode_text(ids[:, :12]), rtol=0, atol=tolerance)


def test_text_tower_causal_and_config():
    torch.manual_seed(1)
    text = pretrained.TextTower(vocab_size=50, context_length=8, width=64, layers=2, embed_dim=6).eval()
    block = text.transformer.resblocks[0]
    assert isinstance(block, pretrained.ResidualBlock) and block.attn.causal and block.attn.heads == 1
    ids = torch.tensor([[49, 3, 4, 0, 0, 0, 0, 0]])  # the largest id is pooled: position 0
    changed = ids.clone()
    changed[0, 1:] = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    with torch.no_grad():
        assert torch.equal(text(ids), text(changed))  # later tokens cannot reach an earlier one
    assert pretrained.text_config(text.state_dict()) == dict(vocab_size=50, context_length=8, width=64, layers=2, embed_dim=6)
    with torch.device("meta"):  # OpenAI's ViT-B/32 and B/16 text tower: 512 wide, 8 heads, 12 layers
        real = pretrained.TextTower()
    assert real.transformer.resblocks[0].attn.heads == 8 and len(real.transformer.resblocks) == 12
    assert real.state_dict()["token_embedding.weight"].shape == (49408, 512)


@pytest.mark.parametrize("archive", ["state_dict", "torchscript"])
def test_loading_openai_files(tiny_clip, tmp_path, archive):
    path = str(tmp_path / "clip.pt")
    x = torch.randn(2, 3, 32, 32)
    ids = pretrained.tokenize(["a photo of a dog", "a sketch"])
    if archive == "torchscript":  # what clip.load downloads: a traced CLIP
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(tiny_clip, (x, ids.long()), check_trace=False), path)
    else:  # a plain state dict, with the metadata keys OpenAI's archives carry, under "state_dict"
        state = {**tiny_clip.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(49408)}
        torch.save({"state_dict": state}, path)
    vision, text = pretrained.load_vision_tower(path), pretrained.load_text_tower(path)
    assert not vision.training and not text.training
    assert not any(p.requires_grad for p in [*vision.parameters(), *text.parameters()])
    with torch.no_grad():
        assert torch.allclose(vision(x)[0], tiny_clip.encode_image(x), rtol=0, atol=1e-5)
        assert torch.allclose(text(ids), tiny_clip.encode_text(ids), rtol=0, atol=1e-5)


def test_text_tower_file_errors(tiny_clip, tmp_path):
    vision_only = tmp_path / "vision_only.pt"
    torch.save({k: v for k, v in tiny_clip.state_dict().items() if k.startswith("visual.")}, vision_only)
    with pytest.raises(common.UserError, match="no text tower"):
        pretrained.load_text_tower(str(vision_only))
    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in tiny_clip.state_dict().items() if k != "ln_final.bias"}, broken)
    with pytest.raises(common.UserError, match="do not fit a text tower") as error:
        pretrained.load_text_tower(str(broken))
    assert "\n" not in str(error.value)
