"""Pretrained networks that only read their authors' published weights, and CLIP's tokenizer.

  - CLIP (OpenAI): the ViT image tower (VisionTower, load_vision_tower) and the text tower (TextTower,
    load_text_tower), both read from OpenAI's files: the TorchScript archives clip.load downloads (ViT-B-32.pt,
    ViT-B-16.pt, ...; read with torch.jit.load, no clip package needed) or a plain state dict in the same key
    layout (clip.model.CLIP.state_dict(), optionally under "state_dict"). Image tower: visual.*; text tower:
    token_embedding.weight, positional_embedding, transformer.resblocks.*, ln_final.*, text_projection. The
    configuration is inferred from tensor shapes as OpenAI's clip.model.build_model does; both towers share
    the transformer blocks (ResidualBlock), the text tower's with a causal mask.
    clip_input and load_reference: CLIP's preprocessing of generated images (tensors) and of image files.
  - CLIP's byte-level BPE tokenizer: tokenize() returns the ids of OpenAI's clip.tokenize, reading OpenAI's
    merges file bpe_simple_vocab_16e6.txt.gz (or a shorter file in the same format), written with the standard
    library only (no ftfy, no regex).
  - e4e (omertov/encoder4editing): the Encoder4Editing encoder (IR-SE50 + FPN + map2style heads) of
    e4e_ffhq_encode.pt ("state_dict" with encoder.* keys, "latent_avg", "opts").

A missing or unreadable file raises common.UserError with one line that says where to get it.
"""

import collections
import functools
import gzip
import html
import importlib.util
import itertools
import math
import os
import re
import sys
import unicodedata
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from common import UserError
from checkpoints import read_checkpoint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OpenAI's public files (clip.load's _MODELS); the hash in the path is the file's sha256
CLIP_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
# OpenAI's BPE merges file, as shipped inside the clip package (openai/CLIP, pip's clip-anytorch)
BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OPENAI_MERGES = 49152 - 256 - 2  # merges OpenAI reads from its file (lines 1 .. 48894; the file holds more)
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
E4E_FILE = "e4e_ffhq_encode.pt"
E4E_SOURCE = "https://github.com/omertov/encoder4editing (README, 'Pretrained Models': FFHQ Inversion)"


def default_clip_path(name):
    """clip.load's cache: ~/.cache/clip/ViT-B-32.pt for 'ViT-B/32'."""
    return os.path.join(os.path.expanduser("~/.cache/clip"), name.replace("/", "-") + ".pt")


def default_bpe_vocab_path():
    """Where a downloaded BPE vocabulary is kept: next to clip.load's weights, ~/.cache/clip/."""
    return os.path.join(os.path.expanduser("~/.cache/clip"), BPE_VOCAB_FILE)


def default_e4e_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", E4E_FILE)


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ------------------------------------------------------------------------------------------------
# CLIP: transformer blocks shared by the two towers (OpenAI key layout)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names (in_proj_*, out_proj);
    causal: token i attends to tokens 0..i only (the text tower's mask)."""

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # [B, L, W]
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, W/h]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # softmax(q k^T / sqrt(W/h) + mask) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualBlock(nn.Module):
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualBlock(width, heads, causal) for _ in range(layers)])


def attention_heads(width):
    """OpenAI's rule (build_model): one head per 64 channels; toy widths under 64 get one head."""
    return max(1, width // 64)


# ------------------------------------------------------------------------------------------------
# CLIP: the ViT image tower (visual.*) and the text tower


class VisionTower(nn.Module):
    """CLIP's ViT image encoder, batch-first. forward(x) -> (embedding [B, out_dim] (not normalised),
    {layer: tokens [B, grid^2, width]}) with the tokens after block `layer` (0-based), CLS excluded."""

    def __init__(self, width=768, layers=12, patch=32, resolution=224, out_dim=512):
        super().__init__()
        self.resolution, self.patch = resolution, patch
        grid = resolution // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, attention_heads(width))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    @property
    def depth(self):
        return len(self.transformer.resblocks)

    def forward(self, x, return_layers=()):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))  # [B, 1 + grid^2, W]
        tokens = {}
        for k, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if k in return_layers:
                tokens[k] = x[:, 1:]  # the block's residual stream, CLS dropped
        return self.ln_post(x[:, 0]) @ self.proj, tokens


class TextTower(nn.Module):
    """CLIP's text encoder: token ids [N, L] (L <= context_length, from tokenize) -> the projected features of
    OpenAI's encode_text [N, embed_dim] (not normalised): causal transformer, ln_final, the features at the
    end-of-text token (the largest id of each row, as OpenAI), text_projection."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=12, embed_dim=512):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.transformer = Transformer(width, layers, attention_heads(width), causal=True)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))

    def forward(self, ids):  # [N, L] integer
        n, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # [N, L, W]
        x = self.ln_final(self.transformer.resblocks(x))  # [N, L, W]
        end = x[torch.arange(n, device=ids.device), ids.argmax(dim=-1)]  # [N, W], at each row's end-of-text token
        return end @ self.text_projection  # [N, D]


def vision_config(state_dict):
    """VisionTower kwargs from OpenAI visual.* shapes (as clip.build_model reads them)."""
    width, _, patch, _ = state_dict["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    grid = round((state_dict["positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(width=width, layers=layers, patch=patch, resolution=grid * patch, out_dim=state_dict["proj"].shape[1])


def text_config(state_dict):
    """TextTower kwargs from OpenAI's text shapes (as clip.build_model reads them)."""
    return dict(vocab_size=state_dict["token_embedding.weight"].shape[0],
                context_length=state_dict["positional_embedding"].shape[0],
                width=state_dict["ln_final.weight"].shape[0],
                layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
                embed_dim=state_dict["text_projection"].shape[1])


# keys of OpenAI's files that belong to neither tower: the similarity temperature and the archive's metadata
CLIP_SHARED_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")


def read_clip_state_dict(path, tower="vision"):
    """One tower's float32 weights from an OpenAI TorchScript archive (torch.jit.load, no clip package) or a plain
    state dict: tower "vision": visual.* (prefix dropped); "text": the other keys but CLIP_SHARED_KEYS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            full = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        try:
            full = read_checkpoint(path)
        except Exception as error:
            raise UserError(f"CLIP weights {path}: neither a TorchScript archive nor a state dict ({str(error)[:160]})") from None
        if isinstance(full, dict) and isinstance(full.get("state_dict"), dict):
            full = full["state_dict"]
    if not isinstance(full, dict):
        raise UserError(f"CLIP weights {path}: not a state dict")
    if tower == "vision":
        state_dict = {k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.")}
        if "conv1.weight" not in state_dict or "proj" not in state_dict:
            raise UserError(f"CLIP weights {path}: no ViT image tower (visual.conv1.weight / visual.proj); DiFa needs ViT-B/32 and ViT-B/16")
    else:
        state_dict = {k: v for k, v in full.items() if not k.startswith("visual.") and k not in CLIP_SHARED_KEYS}
        if "token_embedding.weight" not in state_dict or "text_projection" not in state_dict:
            raise UserError(f"CLIP weights {path}: no text tower (token_embedding.weight / text_projection)")
    return {k: v.float() for k, v in state_dict.items()}


def resolve_clip_file(name, path):
    """An explicit path must exist; the default cache path is downloaded from OpenAI's public URL when absent."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"CLIP weights not found: {path} (OpenAI's {name} file, e.g. from {CLIP_URLS.get(name, 'clip.load')})")
        return path
    path = default_clip_path(name)
    if os.path.isfile(path):
        return path
    if name not in CLIP_URLS:
        raise UserError(f"no CLIP weights for {name!r} at {path} and no known download link (use ViT-B/32 or ViT-B/16, or pass --clip-weights)")
    url = CLIP_URLS[name]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading CLIP {name} to {path}")
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=url.split("/")[-2], progress=True)
    except Exception as error:
        raise UserError(f"CLIP {name} is not in {path} and could not be downloaded from {url} ({first_line(error)[:120]}); "
                        "put that file there or pass --clip-weights") from None
    return path


def load_tower(path, tower):
    """A frozen CLIP tower ("vision" or "text") of an OpenAI file, its configuration read from the shapes."""
    state_dict = read_clip_state_dict(path, tower)
    module_class, config, what = (VisionTower, vision_config, "ViT image tower") if tower == "vision" else (TextTower, text_config, "text tower")
    try:
        module = module_class(**config(state_dict))
        module.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError) as error:
        raise UserError(f"CLIP weights {path} do not fit a {what} ({first_line(error)[:160]})") from None
    return module.eval().requires_grad_(False)


def load_vision_tower(path):
    return load_tower(path, "vision")


def load_text_tower(path):
    return load_tower(path, "text")


def clip_input(x, resolution, antialias=True):
    """Generated images in [-1, 1] -> CLIP input: bicubic resize to resolution^2, (x+1)/2, CLIP normalisation."""
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=antialias)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def load_reference(path, resolution):
    """CLIP's own PIL preprocessing of an image file, e.g. DiFa's reference (clip.load's transform) -> [1, 3, R, R],
    R = resolution: shorter side to R (PIL bicubic, antialiased), centre crop, convert("RGB"), normalisation.

    As in CLIP, alpha is dropped, not composited: transparent pixels keep their stored colour when the image
    needs no resize, and come out black when it is resized (PIL resamples RGBA as premultiplied colour).
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as opened:
            opened.load()
            image = TF.center_crop(TF.resize(opened, resolution, interpolation=InterpolationMode.BICUBIC), resolution)
            x = TF.to_tensor(image.convert("RGB"))[None]  # [1, 3, R, R] in [0, 1], alpha dropped
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------
# CLIP: the byte-level BPE tokenizer (OpenAI's simple_tokenizer, standard library only)


@functools.lru_cache(maxsize=None)
def byte_symbols():
    """OpenAI's (GPT-2's) reversible byte -> character table, in OpenAI's order, which fixes the first 256 ids:
    the printable Latin-1 bytes '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves; then the 68 others (controls,
    space, no-break space, soft hyphen) in byte order stand for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


# Unicode's White_Space property: what \s means in the `regex` module OpenAI uses (re's \s adds U+001C-U+001F)
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def letter_and_number_classes():
    """re character class bodies for \\p{L} (general category L*) and \\p{N} (N*), from this Python's unicodedata:
    one scan of every code point (~0.3 s, once per process)."""
    ranges, start = {"L": [], "N": []}, 0
    for category, run in itertools.groupby(map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))):
        end = start + sum(1 for _ in run)  # code points [start, end) share this category
        spans = ranges.get(category[0])
        if spans is not None:
            if spans and spans[-1][1] == start - 1:
                spans[-1][1] = end - 1  # Lu next to Ll, ...: one range
            else:
                spans.append([start, end - 1])
        start = end
    return tuple("".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges[major]) for major in "LN")


@functools.lru_cache(maxsize=None)
def split_pattern():
    r"""OpenAI's pre-tokenizer for the standard `re`. OpenAI's pattern (for the `regex` module, case-insensitive),
    applied to cleaned lower-case text:
        <|startoftext|> | <|endoftext|> | 's | 't | 're | 've | 'm | 'll | 'd | [\p{L}]+ | [\p{N}] | [^\s\p{L}\p{N}]+
    Here \p{L}, \p{N} and \s are explicit classes, and case-insensitivity is spelled out: on lower-case text `regex`
    also reads 'ſ (long s) as 's, and U+0345 (combining ypogegrammeni, whose case fold is the letter iota) fits
    no alternative, so it is skipped (found by comparing every code point). re.IGNORECASE is not used: with it,
    re tests these classes (~800 ranges) range by range, several times slower."""
    letters, numbers = letter_and_number_classes()
    specials = f"{re.escape(START_TOKEN)}|{re.escape(END_TOKEN)}"
    others = rf"[^{WHITE_SPACE}{letters}{numbers}\u0345]+"
    return re.compile(rf"{specials}|'[s\u017f]|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|{others}")


def clean_text(text):
    """OpenAI's cleaning without ftfy: HTML entities decoded twice, runs of white space to one space, stripped,
    lower-cased."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(f"[{WHITE_SPACE}]+", " ", text).strip().lower()


class BPETokenizer:
    """OpenAI's CLIP tokenizer over a list of merges (pairs of symbols, in rank order).

    Vocabulary, in id order: the 256 byte symbols, the same with the end-of-word mark '</w>', one token per merge
    (the pair joined), <|startoftext|>, <|endoftext|> (49408 tokens for OpenAI's 48894 merges).
    """

    def __init__(self, merges):
        symbols = list(byte_symbols().values())
        self.tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(pair) for pair in merges), START_TOKEN, END_TOKEN]
        self.ids = {token: i for i, token in enumerate(self.tokens)}  # a repeated token keeps its last id, as OpenAI
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start, self.end = self.ids[START_TOKEN], self.ids[END_TOKEN]
        self.word_cache = {}

    def merge(self, word):
        """The BPE symbols of one pre-token (a string of byte symbols): the last symbol takes '</w>', then the adjacent
        pair of lowest rank is merged wherever it occurs (left to right), until no adjacent pair is a merge."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        """Token ids of a text, without the start and end tokens."""
        table, ids = byte_symbols(), []
        for piece in split_pattern().findall(clean_text(text)):
            if piece in (START_TOKEN, END_TOKEN):
                ids.append(self.ids[piece])
                continue
            word = "".join(table[b] for b in piece.encode("utf-8"))
            if word not in self.word_cache:
                self.word_cache[word] = [self.ids[part] for part in self.merge(word)]
            ids.extend(self.word_cache[word])
        return ids


def installed_bpe_vocab():
    """The merges file inside an installed clip package (openai/CLIP, clip-anytorch), found without importing it;
    None when there is none."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], BPE_VOCAB_FILE)
    return path if os.path.isfile(path) else None


def resolve_bpe_vocab(vocab=None):
    """The merges file: `vocab` when given; else the one inside an installed clip package (openai/CLIP,
    clip-anytorch); else ~/.cache/clip/, downloaded there from OpenAI's repository (sha256-checked) when absent."""
    if vocab:
        if not os.path.isfile(vocab):
            raise UserError(f"BPE vocabulary not found: {vocab} (OpenAI's {BPE_VOCAB_FILE}, or a merges file in its format)")
        return os.fspath(vocab)
    path = installed_bpe_vocab()
    if path:
        return path
    path = default_bpe_vocab_path()
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading CLIP's BPE vocabulary to {path}")
    try:
        torch.hub.download_url_to_file(BPE_VOCAB_URL, path, hash_prefix=BPE_VOCAB_SHA256, progress=False)
    except Exception as error:
        raise UserError(f"CLIP's BPE vocabulary {BPE_VOCAB_FILE} is not installed and could not be downloaded from {BPE_VOCAB_URL} "
                        f"({first_line(error)[:120]}); pip install clip-anytorch, or put the file at {path}") from None
    return path


@functools.lru_cache(maxsize=None)
def load_tokenizer(path):
    """A BPETokenizer from a merges file (gzip when the name ends in .gz): a version line, then one merge per line,
    "a b". OpenAI's file holds more merges than CLIP uses: lines 1 .. 48894 are read, as OpenAI does; a shorter
    file (a toy vocabulary) gives all its merges."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as file:
            lines = file.read().decode("utf-8").split("\n")[1:1 + OPENAI_MERGES]
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise UserError(f"{path}: not a readable BPE merges file ({first_line(error)[:120]})") from None
    while lines and not lines[-1]:
        lines.pop()  # the final newline of a shorter file
    merges = [tuple(line.split()) for line in lines]
    bad = next((k for k, pair in enumerate(merges) if len(pair) != 2), None)
    if bad is not None:
        raise UserError(f"{path}: line {bad + 2} is not a merge of two symbols: {lines[bad][:60]!r}")
    return BPETokenizer(merges)


def tokenize(texts, context_length=77, truncate=False, vocab=None):
    """OpenAI's clip.tokenize: a string or a list of strings -> int32 ids [N, context_length], each row
    <|startoftext|> text <|endoftext|> then zeros. Too long: RuntimeError, or with truncate the first
    context_length ids with <|endoftext|> last. vocab: a merges file (default: see resolve_bpe_vocab).

    The ids equal clip.tokenize's (torch.int, as OpenAI returns for torch >= 1.8; the clip-anytorch package
    returns int64) on every text that ftfy.fix_text leaves unchanged. OpenAI's cleaning runs ftfy.fix_text first,
    which this skips: text it would repair (mojibake, curly quotes, full-width forms, ligatures, text that is
    not NFC, control characters, entities escaped three times: ftfy decodes one level on lines without '<', then
    both decode two) may tokenize differently. Letters and numbers follow this Python's Unicode tables
    (unicodedata), which can be older than the regex module's: characters assigned since then are neither.
    """
    tokenizer = load_tokenizer(resolve_bpe_vocab(vocab))
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.int)  # [N, L]
    for row, text in enumerate(texts):
        ids = [tokenizer.start, *tokenizer.encode(text), tokenizer.end]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = tokenizer.end
        result[row, :len(ids)] = torch.tensor(ids)
    return result


def vocab_size(vocab=None):
    """Number of token ids of a merges file (49408 for OpenAI's): the TextTower's vocab_size for it."""
    return len(load_tokenizer(resolve_bpe_vocab(vocab)).tokens)


# ------------------------------------------------------------------------------------------------
# e4e (Encoder4Editing: IR-SE50 + FPN + map2style heads; key layout of encoder.*)


class SEModule(nn.Module):
    def __init__(self, channels, mid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.fc2 = nn.Conv2d(mid, channels, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """BN, conv3x3, PReLU, conv3x3 (stride), BN, SE; shortcut: 1x1 conv + BN, or subsampling when widths agree."""

    def __init__(self, cin, depth, stride, se_reduction=16):
        super().__init__()
        self.stride = stride
        self.shortcut_layer = None if cin == depth else nn.Sequential(
            nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth),
            SEModule(depth, max(1, depth // se_reduction)))

    def forward(self, x):
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class EqualLinear(nn.Module):
    """pSp's EqualLinear at lr_mul 1: y = x (W / sqrt(in))^T + b."""

    def __init__(self, din, dout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din))
        self.bias = nn.Parameter(torch.zeros(dout))

    def forward(self, x):
        return F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)


class StyleHead(nn.Module):
    """map2style: log2(spatial) stride-2 conv3x3 + LeakyReLU(0.01), then EqualLinear."""

    def __init__(self, channels, style_dim, spatial):
        super().__init__()
        layers = []
        for k in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels if k == 0 else style_dim, style_dim, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(style_dim, style_dim)

    def forward(self, x):
        return self.linear(self.convs(x).flatten(1))


class E4E(nn.Module):
    """Encoder4Editing at the inference stage: w+ = w0 1 + [0, delta_1 .. delta_{n-1}] + latent_avg, [B, n_styles, D].

    widths / units: the IR-SE body's four stages (IR-SE50: 64, 128, 256, 512 / 3, 4, 14, 3); the taps c1, c2, c3
    are the ends of stages 2, 3, 4; heads 0-2 read c3, 3-6 p2 = up(c3) + lat1(c2), 7.. p1 = up(p2) + lat2(c1).
    """

    COARSE, MIDDLE = 3, 7

    def __init__(self, widths=(64, 128, 256, 512), units=(3, 4, 14, 3), style_dim=512, n_styles=18, size=256, se_reduction=16):
        super().__init__()
        self.size = size
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        body, cin, self.taps = [], widths[0], []
        for width, n in zip(widths, units):
            for k in range(n):
                body.append(BottleneckIRSE(cin, width, 2 if k == 0 else 1, se_reduction))
                cin = width
            self.taps.append(len(body) - 1)
        self.body = nn.Sequential(*body)
        c3 = size // 16
        self.styles = nn.ModuleList(
            StyleHead(widths[3], style_dim, c3 if i < self.COARSE else 2 * c3 if i < self.MIDDLE else 4 * c3) for i in range(n_styles))
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], 1)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], 1)
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim))

    def forward(self, x):  # x: [B, 3, size, size] normalised to [-1, 1]
        x = self.input_layer(x)
        feats = {}
        for k, unit in enumerate(self.body):
            x = unit(x)
            feats[k] = x
        c1, c2, c3 = (feats[t] for t in self.taps[1:])

        def up_add(a, b):
            return F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True) + b

        w = self.styles[0](c3)[:, None].repeat(1, len(self.styles), 1)  # [B, n, D]
        deltas, features = [torch.zeros_like(w[:, 0])], c3
        for i in range(1, len(self.styles)):
            if i == self.COARSE:
                p2 = features = up_add(c3, self.latlayer1(c2))
            elif i == self.MIDDLE:
                features = up_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](features))
        return w + torch.stack(deltas, 1) + self.latent_avg


def e4e_config(state_dict):
    """E4E kwargs from encoder.* shapes."""
    n_units = len({k.split(".")[1] for k in state_dict if k.startswith("body.")})
    widths, units = [], []
    for k in range(n_units):
        depth = state_dict[f"body.{k}.res_layer.1.weight"].shape[0]
        if not widths or depth != widths[-1]:
            widths.append(depth)
            units.append(0)
        units[-1] += 1
    n_styles = len({k.split(".")[1] for k in state_dict if k.startswith("styles.")})
    n_convs = len({k.split(".")[3] for k in state_dict if k.startswith("styles.0.convs.")})
    se_mid = state_dict["body.0.res_layer.5.fc1.weight"].shape[0]
    return dict(widths=tuple(widths), units=tuple(units), style_dim=state_dict["styles.0.linear.weight"].shape[0],
                n_styles=n_styles, size=16 * 2**n_convs, se_reduction=max(1, widths[0] // se_mid))


def load_e4e(path):
    """The frozen e4e encoder of e4e_ffhq_encode.pt (default: torch hub's checkpoints folder; never downloaded)."""
    if not path:
        path = default_e4e_path()
        if not os.path.isfile(path):
            raise UserError(f"the e4e encoder is needed for L_scc: get {E4E_FILE} from {E4E_SOURCE} and put it at {path} "
                            "(or pass --e4e PATH; --psp-model-weight 0 runs without it)")
    elif not os.path.isfile(path):
        raise UserError(f"e4e weights not found: {path} (get {E4E_FILE} from {E4E_SOURCE})")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "latent_avg" not in ckpt:
        raise UserError(f"{path} is not an e4e checkpoint (expected 'state_dict' with encoder.* keys and 'latent_avg')")
    state_dict = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing" or "styles.0.linear.weight" not in state_dict:
        raise UserError(f"{path}: not an Encoder4Editing checkpoint (encoder_type {opts.get('encoder_type')!r})")
    try:
        encoder = E4E(**e4e_config(state_dict))
        latent_avg = ckpt["latent_avg"].float()
        state_dict["latent_avg"] = latent_avg.reshape(-1, latent_avg.shape[-1]).expand_as(encoder.latent_avg).clone()
        encoder.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise UserError(f"{path}: the encoder.* weights do not fit e4e ({first_line(error)[:160]})") from None
    return encoder.eval().requires_grad_(False)


def e4e_input(x, size, antialias=True):
    """[-1, 1] -> e4e input: bilinear resize to size^2; (x01 - 0.5) / 0.5 is x again."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
