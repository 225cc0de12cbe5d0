"""Can the Atlas reader pick the passage that names the asked entity? The reader alone, on the facts task.

The fact-lookup experiment (launcher/atlas_facts.py) ends with the gold passage first for every question
yet exact match ~0.2 (issue 22). This trains only the FiD reader of the same config, with no retriever:
each training question comes with its gold passage and `--distractors` fact passages of *other* entities
(they state a value too, as the retrieved ones do), shuffled. Held-out questions are scored side by side
with the gold passage alone, with random / same-relation / name-sharing distractors, and closed book:
a reader that checks the entity scores with distractors what it scores alone; one that copies any value
scores about ``alone / (distractors + 1)``.

`--facts fresh` draws a new value (and relation) for every training passage and question, so no training
answer can be memorised: what is left to learn is reading.

    python bench/atlas_reader_probe.py --steps 600 --gold-alone-steps 150 --distractors hard
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import time

import numpy as np
import torch

from hybrid_pretrain.base.typed_config import build, deep_merge, parse_override, read_yaml
from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.retrieval.encoder import pad_token_lists
from hybrid_pretrain.synthetic.atlas_facts import FactsRun, encode_queries, exact_matches, model_config, prepare
from hybrid_pretrain.synthetic.facts import Query
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine

KINDS = ("random", "relation", "hard")  # other entities; same relation; same relation and a shared name token


class Distractors:
    """Other entities' fact passages for a question, by kind, from a seeded generator."""

    def __init__(self, run: FactsRun, seed: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.prep = prepare(run, progress=False, log=lambda _: None)
        d, tok, store = self.prep.data, self.prep.tokenizer, self.prep.store
        self.data, self.tok, self.rng = d, tok, random.Random(seed)
        queries = d.test + d.train
        self.gold_row = dict(zip((q.entity for q in queries), store.rows_of([q.gold_id for q in queries]).tolist()))
        self.relation = {q.entity: q.text.split()[3] for q in queries}  # "What is the <relation> of <name>?"
        self.name_tokens = {e: set(tok.encode_batch([f" {n} is"])[0][:-1]) for e, n in enumerate(d.names)}
        self.by_relation: dict[str, list[int]] = {}
        self.by_token: dict[tuple[str, int], list[int]] = {}
        for e, r in self.relation.items():
            self.by_relation.setdefault(r, []).append(e)
            for t in self.name_tokens[e]:
                self.by_token.setdefault((r, t), []).append(e)

    def entities(self, e: int, kind: str, n: int) -> list[int]:
        """`n` entities other than `e`: name-sharing ones first for 'hard', then of e's relation (or any)."""
        out: list[int] = []
        if kind == "hard":
            pool = sorted({o for t in self.name_tokens[e] for o in self.by_token[(self.relation[e], t)]} - {e})
            out = self.rng.sample(pool, min(n, len(pool)))
        pool = self.by_relation[self.relation[e]] if kind != "random" else range(len(self.data.names))
        while len(out) < n:
            o = self.rng.choice(pool)
            if o != e and o not in out:
                out.append(o)
        return out

    def contexts(self, queries: list[Query], kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gold passage plus `n` distractors, shuffled -> ids and mask (B, n + 1, P)."""
        rows = []
        for q in queries:
            r = [self.gold_row[q.entity]] + [self.gold_row[o] for o in self.entities(q.entity, kind, n)]
            self.rng.shuffle(r)
            rows.append(r)
        tokens, mask = self.prep.passages
        index = torch.tensor(rows)  # (B, n + 1)
        return tokens[index], mask[index]

    def fresh(self, queries: list[Query], kind: str, n: int, query_len: int) -> tuple[torch.Tensor, ...]:
        """The same questions' entities with a newly drawn relation and value for each passage ->
        inputs, labels (B, Lq + T) and passages (B, n + 1, P): nothing to memorise."""
        values = sorted({q.answer for q in self.data.train})
        relations = sorted(set(self.relation.values()))
        asked, texts = [], []
        for q in queries:
            relation, value = self.rng.choice(relations), self.rng.choice(values)
            others = self.entities(q.entity, kind, n) if n else []
            passages = [f"The {relation} of {self.data.names[q.entity]} is {value}."] + [
                f"The {relation} of {self.data.names[o]} is {self.rng.choice(values)}." for o in others]
            self.rng.shuffle(passages)
            texts.append(passages)
            asked.append(Query(f"What is the {relation} of {self.data.names[q.entity]}?", value, q.entity, 0))
        inputs, labels = encode_queries(asked, self.tok, query_len)
        P = self.prep.passages[0].shape[1]
        tokens, mask = pad_token_lists(self.tok.encode_batch([t for ps in texts for t in ps]), self.tok.pad_id, P)
        return inputs, labels, tokens.view(len(asked), n + 1, P), mask.view(len(asked), n + 1, P)


@torch.no_grad()
def scores(model: Atlas, ds: Distractors, inputs: torch.Tensor, labels: torch.Tensor,
           sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Held-out exact match with each context set, and closed book."""
    model.eval()
    Lq, out = model.opts.query_len, {}
    for name, (tokens, mask) in sets.items():
        right = sum(exact_matches(model(inputs[i:i + 100], passages=(tokens[i:i + 100], mask[i:i + 100])),
                                  labels[i:i + 100, Lq:]) for i in range(0, len(inputs), 100))
        out[name] = right / len(inputs)
    empty = (inputs.new_zeros(len(inputs), 1, 0), torch.zeros(len(inputs), 1, 0, dtype=torch.bool))
    out["closed book"] = exact_matches(model(inputs, passages=empty), labels[:, Lq:]) / len(inputs)
    model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/debug_atlas_facts.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. model.d_model=128")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--gold-alone-steps", type=int, default=150, help="first steps with the gold passage alone")
    p.add_argument("--distractors", choices=KINDS, default="hard", help="training distractor kind")
    p.add_argument("--n-distractors", type=int, default=3, help="distractors per training question")
    p.add_argument("--facts", choices=("task", "fresh"), default="task",
                   help="task: the task's training facts; fresh: a new relation and value for every draw")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--evals", type=int, default=10, help="evaluations over the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    values = read_yaml(args.config, example="configs/debug_atlas_facts.yaml")
    for text in args.overrides:
        values = deep_merge(values, parse_override(text))
    run = build(FactsRun, values, source=args.config)
    run.retriever_init, run.out_dir = "untrained", f"runs/reader_probe_{run.vocab_size}"  # no bi-encoder needed
    run.settings = ["pdist"]
    run.validate()
    ds = Distractors(run, args.seed)
    data, tok = ds.data, ds.tok
    torch.manual_seed(args.seed)
    model = Atlas(model_config(run, tok.vocab_size, "pdist"))
    Lq = model.opts.query_len
    train_in, train_labels = encode_queries(data.train, tok, Lq)
    test_in, test_labels = encode_queries(data.test, tok, Lq)
    sets = {"gold alone": ds.contexts(data.test, "random", 0), **{
        f"+3 {k}": ds.contexts(data.test, k, 3) for k in KINDS}, "+1 hard": ds.contexts(data.test, "hard", 1)}
    print(f"{len(data.test)} held-out questions, chance {run.task.chance:.3f}; columns: exact match with "
          + ", ".join([*sets, "closed book"]))
    optimizer = torch.optim.AdamW(param_groups(model.reader, args.lr, run.train.weight_decay), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(run.train.warmup_steps, args.steps, 0.1))
    order = torch.Generator().manual_seed(args.seed + 1)
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(data.train), (args.batch_size,), generator=order)
        n = 0 if step <= args.gold_alone_steps else args.n_distractors
        queries = [data.train[int(i)] for i in idx]
        if args.facts == "fresh":
            x, y, tokens, mask = ds.fresh(queries, args.distractors, n, Lq)
        else:
            (x, y), (tokens, mask) = (train_in[idx], train_labels[idx]), ds.contexts(queries, args.distractors, n)
        loss = model(x, y, passages=(tokens, mask))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % max(1, args.steps // args.evals) == 0 or step == args.steps:
            got = scores(model, ds, test_in, test_labels, sets)
            print(f"step {step} train loss {np.mean(losses[-50:]):.3f} | "
                  + " ".join(f"{k} {v:.3f}" for k, v in got.items()) + f" | {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
