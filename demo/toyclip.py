"""The toy CLIP: a small image-text model trained on the demo's toy faces, the demo's stand-in for OpenAI's CLIP.

    OMP_NUM_THREADS=1 python -m demo.toyclip   # writes demo/toyclip.pt and demo/toyclip_vocab.txt.gz (the shipped weights, exactly)

What it is: a ViT image tower (16 px, patch 2, width 32, 4 blocks) and a causal text tower (width 32, 2 blocks,
context 32) with a shared 32-d embedding, saved as a plain state dict in OpenAI's CLIP layout (visual.* for the
image tower; token_embedding, positional_embedding, transformer.*, ln_final, text_projection; logit_scale), so
pretrained.load_vision_tower and pretrained.load_text_tower read it as they read ViT-B/32. Its tokenizer is
pretrained.tokenize with demo/toyclip_vocab.txt.gz, a merges file in OpenAI's format (a version line, then one
merge "a b" per line) learned here: byte-level BPE on the caption corpus, merged until every caption word is
one token, so the vocabulary is the 512 byte tokens, one token per merge and the two special tokens.

How it is trained: renders of training faces in all three styles (demo.toyfaces.STYLES), each paired with a
caption written from the face's own parameters: a style phrase ("a photo of a face", "a pencil sketch of a
face", "a photo of a face with sunglasses", or a variant) and a random subset of attributes the image shows
(hair style and colour, smile or frown, open mouth, gaze, head turn, skin tone, shirt and background colour;
colours only where the style shows them); 30% of captions are the style phrase alone. Loss: CLIP's symmetric
InfoNCE with a learned temperature,
    L = (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2,   I, T unit embeddings [B, D],  s = exp(logit_scale) <= 100.
Images go through pretrained.clip_input (antialiased resize of the 32-px renders to 16 px, CLIP's normalisation),
as difa.py feeds generated images.

What makes it a better guide (measured with the testbed's DiFa and NADA rows; docs/demo-and-testbed.md): a guide that
follows CLIP's gradient moves pixels wherever the embedding moves fastest. OpenAI's CLIP reads a 1024-px
generator's images at 224 px, so a change must span several pixels to count; here the tower reads the 32-px
generator at half its resolution for the same reason (at 32 px DiFa and NADA turned faces pale and speckled).
Training augments each image with a random shift of up to 2 px and Gaussian pixel noise of std U(0, 0.25), so
single-pixel patterns carry no signal, and half of the photos are washed out (faded toward the paper colour,
greyed, or grey shading on paper) yet captioned as photos, so "pale" alone does not read as "sketch". Tried and
dropped: PGD adversarial training of the image tower (eps 0.03 and 0.06: the guides whiten faces as before or stall,
and zero-shot accuracy fell to 0.67 on photos); pixel noise up to std 0.7; mixup of each photo with its own sketch,
(1 - t) photo + t sketch under both captions weighted 1 - t and t (DiFa still whitens, the other three rows stall);
this 16-px tower paired with a 32-px one, like the official ViT-B/32 + ViT-B/16 pair (DiFa and NADA from the sketch
whiten further, FD 92 / 102; from text the faces stay near the source, p(sketch) 0.008 / 0.26).
The guides still whiten faces rather than draw lines, and how far the text rows move depends on the training seed
(docs/demo-and-testbed.md). That is this CLIP's optimum, not a failure to reach it: it rates DiFa's whitened samples
nearer the reference sketch than real sketch renders (docs/methods.md, DiFa).
The command prints the zero-shot style accuracy on held-out renders (seeds from toyfaces.EVAL_SEED_START on)
with the three first style phrases as prompts.
"""

import argparse
import collections
import colorsys
import gzip
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrained  # noqa: E402
from demo import toyfaces  # noqa: E402

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
TOYCLIP_PATH = os.path.join(DEMO_DIR, "toyclip.pt")
VOCAB_PATH = os.path.join(DEMO_DIR, "toyclip_vocab.txt.gz")
TRAIN_SEED_START = 4_000_000  # training faces: disjoint from the source's (0 ..), the toy network's and the targets'
EVAL_SEED_START = toyfaces.EVAL_SEED_START + 600_000  # held-out faces of the zero-shot report and the tests
VOCAB_HEADER = "#version: 0.2 (demo/toyclip.py: byte-level BPE merges of the toy-face captions)"

# style phrases: the first of each is the zero-shot prompt; the others vary the wording during training
STYLE_PHRASES = {
    "source": ("a photo of a face", "a colour photo of a face", "a face"),
    "sketch": ("a pencil sketch of a face", "a sketch of a face", "a pencil drawing of a face"),
    "sunglasses": ("a photo of a face with sunglasses", "a face with sunglasses", "a face wearing sunglasses"),
}
PROMPTS = tuple(STYLE_PHRASES[style][0] for style in toyfaces.STYLES)
MAX_ATTRIBUTES = 4
HAIR_COLOUR_NAMES = ("black", "brown", "light brown", "blond", "red", "grey")  # toyfaces.HAIR_COLOURS, in order
HUE_NAMES = ((20, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"), (330, "purple"), (360, "red"))


def colour_name(rgb):
    """A plain colour word for an RGB triple in 0..255: grey / white / black when unsaturated, else its hue's name."""
    h, s, v = colorsys.rgb_to_hsv(*(np.clip(np.asarray(rgb, float), 0, 255) / 255))
    if s < 0.25:
        return "white" if v > 0.8 else "black" if v < 0.3 else "grey"
    return next(name for bound, name in HUE_NAMES if h * 360 < bound)


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def attributes(params, style, colour=None):
    """The attribute phrases a render of `params` in `style` shows (colours only where the style shows colour;
    colour=False drops them, for photos turned grey)."""
    colour = style != "sketch" if colour is None else colour
    hair_colour = HAIR_COLOUR_NAMES[int(np.argmin(np.linalg.norm(toyfaces.HAIR_COLOURS - params["hair"], axis=1)))]
    hair = {"short": "short hair", "long": "long hair", "bun": "a hair bun", "bald": "bald"}[params["hair_style"]]
    if colour and params["hair_style"] in ("short", "long"):
        hair = f"{hair.split()[0]} {hair_colour} hair"
    found = [hair]
    if params["mouth_curve"] < -0.35:  # the mouth line's middle lower than its corners
        found.append("smiling")
    elif params["mouth_curve"] > 0.35:
        found.append("frowning")
    if params["mouth_open"] > 0.3:
        found.append("an open mouth")
    if style != "sunglasses" and abs(params["gaze_x"]) > 0.4:
        found.append("looking right" if params["gaze_x"] > 0 else "looking left")
    if abs(params["yaw"]) > 0.5:
        found.append("head turned right" if params["yaw"] > 0 else "head turned left")
    if colour:
        found.append("light skin" if params["skin"].mean() > 190 else "dark skin" if params["skin"].mean() < 140 else "medium skin")
        found += [with_article(f"{colour_name(params['shirt'])} shirt"),
                  with_article(f"{colour_name((params['bg_top'] + params['bg_bottom']) / 2)} background")]
    return found


def caption(params, style, rng, colour=None, style_only=0.0):
    """A training caption: a random style phrase, then each attribute with probability 1/2, in random order, at
    most MAX_ATTRIBUTES of them (the longest caption then fits the 32-token context); with probability
    `style_only` the style phrase alone (it places the bare prompts among their images)."""
    phrases = STYLE_PHRASES[style]
    chosen = [a for a in attributes(params, style, colour) if rng.random() < 0.5] if rng.random() >= style_only else []
    rng.shuffle(chosen)
    return ", ".join([phrases[rng.integers(len(phrases))], *chosen[:MAX_ATTRIBUTES]])


# ------------------------------------------------------------------------------------------------
# the BPE vocabulary: merges learned on the caption corpus, in OpenAI's merges-file format


def learn_merges(texts):
    """Byte-level BPE: pre-tokenise as pretrained.tokenize does (clean_text, split_pattern, bytes -> byte symbols,
    '</w>' on each word's last symbol), then repeatedly merge the most frequent adjacent pair (ties: the smaller
    pair) until every word is one symbol. Returns the merges in rank order."""
    table = pretrained.byte_symbols()
    counts = collections.Counter()
    for text in texts:
        for piece in pretrained.split_pattern().findall(pretrained.clean_text(text)):
            counts["".join(table[b] for b in piece.encode("utf-8"))] += 1
    words = {tuple([*word[:-1], word[-1] + "</w>"]): n for word, n in counts.items()}
    merges = []
    while True:
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged


def caption_corpus(seeds):
    """Every style phrase and every attribute phrase of the given faces: the text the vocabulary must cover."""
    texts = [phrase for phrases in STYLE_PHRASES.values() for phrase in phrases]
    for seed in seeds:
        params = toyfaces.sample_params(seed)
        texts += [", ".join(attributes(params, style)) for style in toyfaces.STYLES]
    return texts


def write_vocab(path, merges):
    """OpenAI's format: a version line, then "a b" per merge; gzip without a time stamp (same bytes every build)."""
    text = "\n".join([VOCAB_HEADER, *(" ".join(pair) for pair in merges)]) + "\n"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as file:
        file.write(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# the model: pretrained.py's own towers, trained here


class ToyCLIP(nn.Module):
    """The two towers and the temperature; state_dict() is in OpenAI's CLIP layout."""

    def __init__(self, vocab_size, context_length=32, width=32, vision_layers=4, text_layers=2, embed_dim=32, resolution=16):
        super().__init__()
        self.visual = pretrained.VisionTower(width, vision_layers, patch=resolution // 8, resolution=resolution, out_dim=embed_dim)
        self.text = pretrained.TextTower(vocab_size, context_length, width, text_layers, embed_dim)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)  # OpenAI's initialisation
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # OpenAI's initial temperature

    def openai_state_dict(self):
        """visual.* plus the text tower's keys at the top level plus logit_scale, as clip.model.CLIP.state_dict()."""
        return {**{f"visual.{k}": v for k, v in self.visual.state_dict().items()},
                **self.text.state_dict(), "logit_scale": self.logit_scale.detach().clone()}

    def forward(self, images, ids):  # images [B, 3, 32, 32] in [-1, 1], ids [B, L]
        image_emb = F.normalize(self.visual(pretrained.clip_input(images, self.visual.resolution))[0], dim=-1)  # [B, D]
        text_emb = F.normalize(self.text(ids), dim=-1)  # [B, D]
        return image_emb, text_emb


def contrastive_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE: the i-th image and the i-th caption are the positives of a batch."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()  # [B, B]
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def render_faces(seeds, size=32):
    """Renders of each seed in every style: uint8 [3 n, 3, size, size] (style-major per face) and their params."""
    from concurrent.futures import ThreadPoolExecutor

    params = [toyfaces.sample_params(s) for s in seeds]
    jobs = [(p, style) for p in params for style in toyfaces.STYLES]
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda job: toyfaces.render(job[0], job[1], size), jobs))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), params


@torch.no_grad()
def zero_shot_accuracy(vision, text, vocab, n_faces=300, context_length=32):
    """Per style, the fraction of held-out renders whose nearest prompt (cosine) is that style's PROMPTS entry."""
    prompts = F.normalize(text(pretrained.tokenize(PROMPTS, context_length, vocab=vocab)), dim=-1)  # [3, D]
    seeds = range(EVAL_SEED_START, EVAL_SEED_START + n_faces)
    accuracy = {}
    for k, style in enumerate(toyfaces.STYLES):
        images = toyfaces.render_batch(seeds, style, 32)  # [N, 3, 32, 32]
        emb = F.normalize(vision(pretrained.clip_input(images, vision.resolution))[0], dim=-1)  # [N, D]
        accuracy[style] = float(((emb @ prompts.t()).argmax(1) == k).float().mean())
    return accuracy


def washed_photos(x, rng):
    """Photos that have lost their colour without becoming drawings, each kind a third of the time: faded toward
    the sketches' paper colour by a in U(0.3, 0.9); grey, then faded by a in U(0, 0.6); grey shading multiplied
    onto the paper (a sketch's colours, but filled shading, not lines). Captioned as photos during training, they
    close the shortcut "pale and paper-coloured means sketch" for the CLIP (not fully for the guides: docs/demo-and-testbed.md)."""
    paper = torch.tensor(toyfaces.PAPER_RGB, dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1  # [1, 3, 1, 1]
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)  # [B, 3, H, W]
    kind = torch.from_numpy(rng.integers(3, size=len(x))).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    fade = torch.from_numpy(np.where(kind.flatten().numpy() == 0, rng.uniform(0.3, 0.9, len(x)), rng.uniform(0, 0.6, len(x)))).to(x.dtype).view(-1, 1, 1, 1)
    # x' = (1 - a) x + a paper on colour (kind 0) or grey (kind 1); x' = grey * paper in [0, 1] units (kind 2)
    faded = (1 - fade) * torch.where(kind == 0, x, grey) + fade * paper  # [B, 3, H, W]
    multiplied = (grey + 1) * (paper + 1) / 2 - 1  # [B, 3, H, W]
    return torch.where(kind == 2, multiplied, faded)


def shifted(x, pixels, rng):
    """Each image moved by up to `pixels` in x and y (reflected borders): the tower learns shapes, not positions."""
    padded = F.pad(x, [pixels] * 4, mode="reflect")  # [B, 3, H + 2p, W + 2p]
    offsets = rng.integers(0, 2 * pixels + 1, size=(len(x), 2))
    return torch.stack([padded[i, :, a:a + x.shape[2], b:b + x.shape[3]] for i, (a, b) in enumerate(offsets)])


def train(args, vocab, log=print):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, params = render_faces(range(TRAIN_SEED_START, TRAIN_SEED_START + args.faces))
    model = ToyCLIP(pretrained.vocab_size(vocab), args.context_length, resolution=args.resolution)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, args.lr, total_steps=args.steps, pct_start=0.05)
    for step in range(args.steps):
        idx = torch.from_numpy(rng.choice(len(images), args.batch, replace=False))  # [B]
        x = images[idx].float() / 127.5 - 1  # [B, 3, 32, 32]
        washed = torch.from_numpy((idx.numpy() % 3 != 1) & (rng.random(len(idx)) < args.washed))  # [B] photos only
        x = torch.where(washed.view(-1, 1, 1, 1), washed_photos(x, rng), x)  # [B, 3, 32, 32]
        x = shifted(x, args.shift, rng)  # [B, 3, 32, 32]
        sigma = torch.from_numpy(rng.uniform(0, args.noise, len(x))).float().view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        x = x + sigma * torch.randn_like(x)  # pixel noise: generated images are not clean renders
        texts = [caption(params[i // 3], toyfaces.STYLES[i % 3], rng, colour=False if w else None, style_only=args.style_only)
                 for i, w in zip(idx.tolist(), washed.tolist())]
        ids = pretrained.tokenize(texts, args.context_length, vocab=vocab)  # [B, L]
        loss = contrastive_loss(*model(x, ids), model.logit_scale)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, scale {model.logit_scale.exp().item():.1f}")
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description="train the demo's toy CLIP", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=TOYCLIP_PATH, help="weights (OpenAI's CLIP state-dict layout)")
    p.add_argument("--vocab", default=VOCAB_PATH, help="BPE merges file written for the tokenizer")
    p.add_argument("--faces", type=int, default=2000, help="training faces, each rendered in the three styles (our choice)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (our choice)")
    p.add_argument("--batch", type=int, default=64, help="image-caption pairs per step (our choice)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, one-cycle schedule (our choice)")
    p.add_argument("--washed", type=float, default=0.5, help="share of photos washed out (faded, grey, grey on paper) and still captioned as photos (our choice)")
    p.add_argument("--resolution", type=int, default=16, help="input side of the image tower, 8 x 8 patches; the 32-px renders are resized to it (our choice)")
    p.add_argument("--noise", type=float, default=0.25, help="largest std of the Gaussian pixel noise, drawn per image from U(0, noise) ([-1, 1] units; our choice)")
    p.add_argument("--shift", type=int, default=2, help="largest random shift in pixels (our choice)")
    p.add_argument("--style-only", type=float, default=0.3, help="share of captions that are the style phrase alone (our choice)")
    p.add_argument("--context-length", type=int, default=32, help="text tokens per caption (our choice; OpenAI: 77)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and numpy (our choice)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.time()
    merges = learn_merges(caption_corpus(range(TRAIN_SEED_START, TRAIN_SEED_START + args.faces)))
    write_vocab(args.vocab, merges)
    print(f"wrote {args.vocab}: {len(merges)} merges, {pretrained.vocab_size(args.vocab)} tokens")
    model = train(args, args.vocab)
    torch.save(model.openai_state_dict(), args.out)
    accuracy = zero_shot_accuracy(model.visual, model.text, args.vocab, context_length=args.context_length)
    for style, value in accuracy.items():
        print(f"held-out {style}: zero-shot style accuracy {value:.3f} (prompts {', '.join(repr(t) for t in PROMPTS)})")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
