"""Does Atlas's retriever learn from its reader alone? Train on the fact-lookup task and measure it.

For each retriever setting the same initial Atlas model trains on questions about the training entities.
The retriever never sees a passage label: it learns only through its loss (one of Atlas's four), from
the reader, while the index is re-embedded with the current passage tower every
``retrieval.refresh_every`` steps. Two frozen baselines: ``fixed`` (the initial retriever, Atlas's "fixed
retriever") and ``random`` (an untrained one). Every ``train.eval_every`` steps the model is scored on
questions about held-out entities:

- gold recall@1 and @K: the passage stating the answer is among the first 1 / K the model retrieved;
- exact match: the reader's greedy answer (argmax at every answer position) with its retrieved passages;
- closed-book exact match: the same reader with no passages, the floor (chance for held-out facts).

The retriever starts from the project's generic bi-encoder (``retriever_init: generic``: contrastive
training on the passages alone, `retrieval.contrastive`), as Atlas starts from Contriever, or untrained.
The reader starts from scratch, so it first learns to read while the retriever waits
(``train.retriever_delay``): a reader that cannot read yet gives every passage the same score, and any
retriever loss then pulls the retriever towards scoring its passages alike, which collapses it. In those
steps the reader is given the gold passage (``train.reader_warmup``, see `FactsTrain`): that label reaches
the reader only, never the retriever.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.net import free_port
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.models.atlas.losses import RETRIEVER_LOSSES
from hybrid_pretrain.models.atlas.model import IGNORE_INDEX, Atlas
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.retrieval.config import RetrievalConfig
from hybrid_pretrain.retrieval.contrastive import ContrastiveConfig, train_contrastive
from hybrid_pretrain.retrieval.encoder import DualEncoder, pad_token_lists
from hybrid_pretrain.retrieval.for_training import TrainingRetrieval
from hybrid_pretrain.retrieval.passages import PassageStore, write_store
from hybrid_pretrain.retrieval.service_process import ServiceProcess
from hybrid_pretrain.synthetic.facts import FactsData, FactsTask, Query, generate
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine

FIXED = "fixed"  # the initial retriever, frozen (Atlas's "fixed retriever")
RANDOM = "random"  # an untrained retriever, frozen: the floor every loss must clear
SETTINGS = (*RETRIEVER_LOSSES, FIXED, RANDOM)
INITS = ("generic", "untrained")
TOKENIZER_SAMPLE_BYTES = 1 << 26  # the whole generated text: well under a MB


def default_model() -> ModelConfig:
    # init_std ~ 1/sqrt(d_model): GPT-2's 0.02 is tuned for d_model 768; at 64 it leaves attention logits and
    # the copy path ~40x smaller, and the reader then takes several times longer to learn to copy.
    return ModelConfig(arch="atlas", d_model=64, n_heads=4, layers="A", rotary_dim=16, max_seq_len=36, init_std=0.125,
                       options={"atlas": {"n_passages": 4, "query_len": 12, "passage_len": 24}})


@dataclass
class FactsTrain:
    steps: int = 600
    batch_size: int = 16  # questions per step
    lr: float = 3e-3
    retriever_lr: float = 0.0  # 0: lr
    retriever_delay: int = 100  # steps the reader trains alone before the retriever loss is switched on
    # First steps in which the reader is given each question's gold passage: alone in the first half, then in
    # place of the last of the retriever's top K where the top K misses it. A reader trained from scratch learns
    # to copy from one passage in ~150 steps, but not in 175 when the gold passage is one of four (the signal is
    # diluted over 4x the keys); one that has only read passages alone copies from the wrong one when the
    # entity's distractors are retrieved beside it. Until the reader reads, every retriever loss gets a flat
    # target. The retriever is not trained in these steps and never sees which passage is gold.
    reader_warmup: int = 0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_queries: int = 300  # held-out questions scored at each evaluation (a fixed sample)
    seed: int = 0


@dataclass
class FactsRun:
    """The experiment, as configs/debug_atlas_facts.yaml spells it."""

    name: str = "debug_atlas_facts"
    out_dir: str = ""  # empty: runs/<name>
    task: FactsTask = field(default_factory=FactsTask)
    # of the SentencePiece tokenizer trained on the generated text; large enough that every value word is one
    # token (`prepare` checks): at 1024 and 3000 entities the names take the merges and " banlux" is 3 tokens,
    # a multi-token copy the reader did not learn in 200 steps (exact match at chance with recall@4 0.74)
    vocab_size: int = 2048
    model: ModelConfig = field(default_factory=default_model)
    retriever_init: str = "generic"  # generic: the contrastive bi-encoder below; untrained: as initialised
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(refresh_every=50))
    train: FactsTrain = field(default_factory=FactsTrain)
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))  # retriever losses, fixed, random
    threads: int = 0  # torch CPU threads (0: torch's default)

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def validate(self) -> None:
        self.task.validate()
        self.retrieval.validate()
        self.contrastive.validate()
        if self.model.arch != "atlas":
            raise ConfigError(f"model.arch must be 'atlas' for the facts task, got '{self.model.arch}'")
        if self.retriever_init not in INITS:
            raise ConfigError(f"retriever_init must be one of {', '.join(INITS)}, got '{self.retriever_init}'")
        for name in ("steps", "batch_size", "eval_every", "eval_queries"):
            if getattr(self.train, name) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self.train, name)}")
        if not 0 <= self.train.retriever_delay < self.train.steps:
            raise ConfigError(f"train.retriever_delay must be in [0, train.steps), got {self.train.retriever_delay}")
        if not 0 <= self.train.reader_warmup <= self.train.retriever_delay:
            raise ConfigError(f"train.reader_warmup must be in [0, train.retriever_delay], got "
                              f"{self.train.reader_warmup}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings or len(set(self.settings)) != len(self.settings):
            raise ConfigError(f"settings must be distinct names from {', '.join(SETTINGS)}; got {self.settings}")
        if self.retriever_init == "untrained" and FIXED in self.settings:
            raise ConfigError("setting 'fixed' is 'random' when retriever_init is 'untrained'; drop one")
        if self.retrieval.passages or self.retrieval.index_dir:
            raise ConfigError("retrieval.passages and retrieval.index_dir must be empty: the facts task writes its "
                              "own passage store and one index per setting")
        model_config(self, self.vocab_size, "pdist")  # the model and its options, checked before any work


def model_config(run: FactsRun, vocab_size: int, setting: str) -> ModelConfig:
    """The run's model with the setting's retriever loss ("none" for the frozen retrievers)."""
    cfg = copy.deepcopy(run.model)
    cfg.vocab_size = vocab_size
    atlas = dict(cfg.options.get("atlas") or {})
    atlas["retriever_loss"] = setting if setting in RETRIEVER_LOSSES else "none"
    cfg.options = {**cfg.options, "atlas": atlas}
    if vocab_size:
        Atlas(cfg)  # options and shapes checked where they are defined
    return cfg


@dataclass
class Prepared:
    data: FactsData
    store: PassageStore
    tokenizer: Tokenizer
    train: tuple[torch.Tensor, torch.Tensor]  # inputs (N, Lq + T), labels (N, Lq + T)
    test: tuple[torch.Tensor, torch.Tensor]
    test_gold: np.ndarray  # (M,) gold passage id of each test question
    train_gold_rows: torch.Tensor  # (N,) store row of each training question's gold passage (reader warmup only)
    passages: tuple[torch.Tensor, torch.Tensor]  # every store row's token ids and mask (R, P), as the reader gets them
    generic: dict[str, torch.Tensor] | None  # the generic bi-encoder's weights (retriever_init: generic)


def encode_queries(queries: list[Query], tokenizer: Tokenizer, query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question padded to `query_len`, then BOS and the answer: inputs and labels (B, query_len + T).

    Labels are the next token at each position (as the LM's), kept only on the answer and the closing EOS.
    The answer is encoded as it stands in its passage, after a space: SentencePiece gives " vorlan" one
    token but "vorlan" at the start of a text several, and a reader can only copy tokens it was shown.
    """
    qs = tokenizer.encode_batch([q.text for q in queries])
    answers = tokenizer.encode_batch([" " + q.answer for q in queries])
    longest = max(len(q) for q in qs)
    if longest > query_len:
        raise ConfigError(f"a question is {longest} tokens; raise model.options.atlas.query_len "
                          f"({query_len}) to at least that")
    T = max(len(a) for a in answers) + 1
    inputs = torch.full((len(queries), query_len + T), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    for i, (q, a) in enumerate(zip(qs, answers)):
        inputs[i, : len(q)] = torch.tensor(q)
        target = [tokenizer.bos_id, *a]  # the decoder reads BOS, then the answer so far
        inputs[i, query_len : query_len + len(target)] = torch.tensor(target)
        labels[i, query_len : query_len + len(target)] = torch.tensor([*a, tokenizer.eos_id])
    return inputs, labels


def prepare(run: FactsRun, progress: bool = True, log: Callable[[str], None] = print) -> Prepared:
    """Generate the task, write its passage store, train its tokenizer (and the generic bi-encoder)."""
    data = generate(run.task)
    root = run.out_path / "task"
    words = max(len(text.split()) for _, _, text in data.documents)
    store = write_store(root / "passages", data.documents, words=words, progress=False)
    if len(store) != len(data.documents):
        raise RuntimeError(f"expected one passage per document, got {len(store)} for {len(data.documents)}")
    tokenizer = Tokenizer(train_tokenizer(data.texts(), root / "tokenizer", run.vocab_size, TOKENIZER_SAMPLE_BYTES,
                                          log=log))
    split = sorted({q.answer for q in data.train + data.test
                    if len(tokenizer.encode_batch([" " + q.answer])[0]) != 1})
    if split:
        raise ConfigError(f"{len(split)} value words are several tokens (e.g. '{split[0]}'): raise vocab_size "
                          f"({run.vocab_size}) so each answer is a one-token copy")
    cfg = model_config(run, tokenizer.vocab_size, "pdist")
    query_len = Atlas(cfg).opts.query_len
    rng = random.Random(run.train.seed)
    test = rng.sample(data.test, min(run.train.eval_queries, len(data.test)))
    log(f"facts task: {len(data.names)} entities ({len(data.test)} held out), {len(store)} passages, "
        f"{len(data.train)} training questions, {len(test)} test questions, tokenizer of {tokenizer.vocab_size}")
    generic = None
    if run.retriever_init == "generic":
        torch.manual_seed(run.contrastive.seed)
        encoder = DualEncoder(Atlas(cfg).retriever.cfg, tokenizer)
        train_contrastive(encoder, store, run.contrastive, progress=progress, log=log)
        generic = encoder.query_encoder.state_dict()
    passage_len = Atlas(cfg).opts.passage_len
    passages = pad_token_lists([t[:passage_len] or [tokenizer.eos_id] for t in tokenizer.encode_batch(
        store.texts(range(len(store))))], tokenizer.pad_id, passage_len)  # as PassageSource cuts and pads them
    train_gold_rows = torch.from_numpy(store.rows_of([q.gold_id for q in data.train]))
    return Prepared(data, store, tokenizer, encode_queries(data.train, tokenizer, query_len),
                    encode_queries(test, tokenizer, query_len), np.array([q.gold_id for q in test]),
                    train_gold_rows, passages, generic)


@torch.no_grad()
def evaluate(model: Atlas, inputs: torch.Tensor, labels: torch.Tensor, gold: np.ndarray,
             batch_size: int = 64) -> dict[str, float]:
    """Gold recall@1 and @K of the model's own retrieval, exact match with it and closed-book."""
    was = model.training
    model.eval()
    hits1 = hitsk = em = closed = 0
    Lq = model.opts.query_len
    for i in range(0, len(inputs), batch_size):
        x, y, g = inputs[i : i + batch_size], labels[i : i + batch_size], gold[i : i + batch_size]
        found = model.retrieve(x[:, :Lq])
        hits1 += int((found.ids[:, 0] == g).sum())
        hitsk += int((found.ids == g[:, None]).any(1).sum())
        em += exact_matches(model(x, passages=(found.tokens, found.mask)), y[:, Lq:])
        empty = (x.new_zeros(len(x), 1, 0), torch.zeros(len(x), 1, 0, dtype=torch.bool))  # (B, 1, 0): no passage
        closed += exact_matches(model(x, passages=empty), y[:, Lq:])
    model.train(was)
    n = len(inputs)
    return {"recall@1": hits1 / n, f"recall@{model.opts.n_passages}": hitsk / n, "exact_match": em / n,
            "closed_book": closed / n}


def exact_matches(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Answers whose every labelled token is the argmax: logits (B, T, V), labels (B, T)."""
    right = (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)  # (B, T)
    return int(right.all(1).sum())


def gold_alone(prep: Prepared, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reader-warmup context of training questions `idx`: the gold passage alone -> ids and mask (B, 1, P)."""
    tokens, mask = prep.passages
    rows = prep.train_gold_rows[idx]
    return tokens[rows][:, None], mask[rows][:, None]


@torch.no_grad()
def gold_among_retrieved(model: Atlas, prep: Prepared, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The retriever's top K for training questions `idx`, the last replaced by the gold passage where it is
    missing -> ids and mask (B, K, P): the reader learns to pick the passage with the answer from the passages
    it will be given (the entity's distractors name it too), and the retriever is not trained by it."""
    found = model.retrieve(prep.train[0][idx, : model.opts.query_len])
    tokens, mask = found.tokens.clone(), found.mask.clone()
    gold_ids = np.asarray(prep.store.ids)[prep.train_gold_rows[idx].numpy()]
    missing = torch.from_numpy(~(found.ids == gold_ids[:, None]).any(1))
    gold_tokens, gold_mask = gold_alone(prep, idx)
    tokens[missing, -1], mask[missing, -1] = gold_tokens[missing, 0], gold_mask[missing, 0]
    return tokens, mask


def build_model(run: FactsRun, prep: Prepared, setting: str) -> Atlas:
    """The setting's model from the shared initial weights: reader from the seed, retriever from run.retriever_init."""
    torch.manual_seed(run.train.seed)
    model = Atlas(model_config(run, prep.tokenizer.vocab_size, setting))
    if prep.generic is not None and setting != RANDOM:
        model.load_retriever(prep.generic)
    if setting in (FIXED, RANDOM):
        model.retriever.requires_grad_(False)
    return model


def optimizer_for(model: Atlas, t: FactsTrain) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the reader on warmup-cosine and the retriever on the same shape, started after the delay."""
    reader = param_groups(model.reader, t.lr, t.weight_decay)
    retriever = param_groups(model.retriever, t.retriever_lr or t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(reader + retriever, lr=t.lr)
    reader_lr = warmup_cosine(t.warmup_steps, t.steps, t.min_lr_ratio)
    later = warmup_cosine(t.warmup_steps, t.steps - t.retriever_delay, t.min_lr_ratio)

    def retriever_lr(step: int) -> float:
        return later(step - t.retriever_delay) if step >= t.retriever_delay else 0.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [reader_lr] * len(reader) + [retriever_lr] * len(retriever))
    return optimizer, schedule


def train_setting(run: FactsRun, prep: Prepared, setting: str, through_service: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train one retriever setting from the shared initial weights; returns its evaluation history.

    `through_service`: every search goes over HTTP to an index service started on the setting's index
    folder (a child process), which the trainer tells to reload after each refresh.
    """
    model = build_model(run, prep, setting)
    retrieval_cfg = copy.deepcopy(run.retrieval)
    if setting in (FIXED, RANDOM):
        retrieval_cfg.refresh_every = 0  # a frozen retriever's index never goes stale
    index_dir = run.out_path / setting / "index"
    shutil.rmtree(index_dir, ignore_errors=True)  # else a rerun searches the last run's final index until a refresh
    # The URL goes into the config before the first index exists, so the service gets its port in advance.
    server = ServiceProcess(index_dir, port=free_port()) if through_service else nullcontext()
    retrieval_cfg.service = server.url if through_service else ""
    # Builds the first index with the initial passage tower; with a service, only its client is made here.
    retrieval = TrainingRetrieval(retrieval_cfg, index_dir, prep.store, model, prep.tokenizer, rank=0, world_size=1,
                                  barrier=lambda: None, log=lambda m: None)
    t = run.train
    optimizer, schedule = optimizer_for(model, t)
    order = torch.Generator().manual_seed(t.seed + 1)
    inputs, labels = prep.train
    start = time.time()
    with server:
        history = [{"step": 0, **evaluate(model, *prep.test, prep.test_gold)}]
        bar = tqdm(range(1, t.steps + 1), desc=setting, unit="step", disable=not progress)
        for step in bar:
            model.learn_retriever = step > t.retriever_delay
            idx = torch.randint(len(inputs), (t.batch_size,), generator=order)
            warm = (gold_alone(prep, idx) if step <= t.reader_warmup // 2 else
                    gold_among_retrieved(model, prep, idx) if step <= t.reader_warmup else None)
            loss = model(inputs[idx], labels[idx], passages=warm)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            schedule.step()
            retrieval.after_step(step)
            if step % t.eval_every == 0 or step == t.steps:
                metrics = model.step_metrics() if model.learn_retriever and setting in RETRIEVER_LOSSES else {}
                history.append({"step": step, **evaluate(model, *prep.test, prep.test_gold),
                                "reader_loss": metrics.get("reader_loss", loss.item()), **metrics})
                bar.set_postfix({k: f"{v:.2f}" for k, v in history[-1].items() if k != "step"})
                if not progress:
                    log(f"{setting} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()
                                                             if k != "step"))
        stats = retrieval.index.stats() if through_service else {}
    return {"setting": setting, "history": history, "seconds": time.time() - start,
            "service": {k: stats.get(k) for k in ("queries", "searches", "errors", "failed", "rejected")}
            if through_service else None,
            "index_version": stats["index"]["version"] if through_service else retrieval.index.version}


def run_experiment(run: FactsRun, through_service: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Every setting of `run` from the same initial weights; writes and returns ``results.json``."""
    run.validate()
    if run.threads:
        torch.set_num_threads(run.threads)
    start = time.time()
    prep = prepare(run, progress=progress, log=log)
    results = {"name": run.name, "chance": run.task.chance, "threads": torch.get_num_threads(),
               "through_service": through_service, "prepare_seconds": time.time() - start, "settings": []}
    path = run.out_path / ("results_service.json" if through_service else "results.json")
    for setting in run.settings:  # written after each setting, so a long run's finished part is kept
        results["settings"].append(train_setting(run, prep, setting, through_service, progress, log))
        path.write_text(json.dumps(results, indent=1))
    log(f"wrote {path}")
    return results


def table(results: dict) -> str:
    """A markdown table: per setting, the last evaluation and the best gold recall@K seen."""
    rows = ["| setting | recall@1 | recall@K | exact match | closed book | best recall@K (step) | seconds |",
            "|---|---|---|---|---|---|---|"]
    for s in results["settings"]:
        last = s["history"][-1]
        k = next(key for key in last if key.startswith("recall@") and key != "recall@1")
        best = max(s["history"], key=lambda h: h[k])
        rows.append(f"| {s['setting']} | {last['recall@1']:.3f} | {last[k]:.3f} | {last['exact_match']:.3f} | "
                    f"{last['closed_book']:.3f} | {best[k]:.3f} ({best['step']}) | {s['seconds']:.0f} |")
    return "\n".join(rows)
